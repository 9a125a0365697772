"""The hardware engine behind ``harness hw``: the seed's three checks, done right, plus an inventory.

1. **Memory bandwidth**: a device-to-device copy of a buffer sized from the card's free memory
   (1/8 of free memory per buffer, capped at 8 GiB, 1 GiB with ``quick``), counting read + write
   (``2 * bytes / time``). The seed's 2 x 40 GB buffers do not fit an 80 GB card.
2. **Dense BF16 GEMM**: 8192^3 ``torch.mm`` on random data, ``2*M*N*K / time``.
3. **P2P bandwidth**: every ordered pair ``i -> j`` of the chosen GPUs (a matrix, both
   directions), with ``torch.cuda.can_device_access_peer`` and the link label between them.

All timing is with CUDA events after warm-up: several repeats of a fixed number of iterations,
the median repeat reported (min and max kept). An NVML inventory (name, memory, clocks, PCIe
generation and width, power limit, topology) is taken, and GPU power, SM clock and temperature
are sampled through NVML during each timed check.

Pass/fail per check comes from a per-model target table (:data:`targets.TARGETS`) whose peaks
are the vendor datasheets' (:mod:`servers.gpu_datasheets`); thresholds are fractions of those
peaks, except the L40S's, which are the seed's own absolute targets. A failing check carries
the known remedy.

A run that cannot measure what it was asked for (P2P with one GPU) is ``invalid``, not a pass:
its ``invalid`` check says why, and ``harness hw`` exits 3 (a failed check outranks it: exit 1).

torch and NVML are imported lazily: without torch or a CUDA GPU the stage says so in one line
and writes a result with ``"status": "skipped"``. Everything that decides pass/fail is a pure
function of recorded numbers (:func:`judge.evaluate`) so it is tested without a GPU.

Modules: :mod:`.model` (the result dataclasses written as ``hardware.json``), :mod:`.targets`
(per-model thresholds), :mod:`.judge` (pass/fail/remedy), :mod:`.measure` (torch timing),
:mod:`.nvml` (power sampling and the inventory), :mod:`.report_io` (``hardware.json`` in and
out), :mod:`.summary` (the text printed), :mod:`.run` (one run, end to end).
"""
