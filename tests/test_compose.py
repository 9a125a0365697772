"""docker-compose.yml, the harness image and the Prometheus/Grafana files, tested for real
on a machine with no Docker engine:

- the compose file is resolved and validated by a real compose implementation (Debian's
  `docker-compose` 1.29 `config`), with and without `--profile gpu`, and its variables checked
  (GPU reservation, loopback host ports, scalable workers, headless or UI by `LOCUST_HEADLESS`,
  which Locust's own parser reads from the master's command and environment);
- `deploy/prometheus/prometheus.yml` passes `promtool check config`; every dashboard query
  parses as PromQL (`promtool check rules`), names only metrics that really exist, and the
  provisioning files agree with the compose mounts;
- the stack itself, without Docker: each service's command from the resolved compose file
  (simulator, Locust master, the worker twice as `--scale locust-worker=2`, Prometheus) runs as
  a process on loopback, with service names and ports mapped to 127.0.0.1 and free ports and
  container paths to temporary folders; a headless run goes through, Prometheus (Debian's
  package) scrapes both the harness exporter and the simulator, and every dashboard query
  returns data from it.

Each part skips, saying which tool is missing, when its tool is absent (`make test` installs
them all).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port_block
from loadrun import http_get

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROM_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-harness.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "llm-harness.yml"
VENV_BIN = Path(sys.executable).parent

DOCKER_COMPOSE = shutil.which("docker-compose")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="Debian's docker-compose package is not installed (apt-get install -y "
    "docker-compose; `make test` installs it): it is the real compose implementation that resolves and "
    "validates docker-compose.yml")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed: apt-get install -y prometheus")

DEFAULT_SERVICES = {"simulator", "locust-master", "locust-worker", "prometheus", "grafana"}
# Series Prometheus makes itself for every target (dashboards may query them).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


# -- the compose file, as a real compose implementation resolves it ----------------------------
def compose(*args: str, variables: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run docker-compose on our file with only the given variables set (none of the caller's)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    env.update(variables or {})
    return subprocess.run([DOCKER_COMPOSE, "-f", str(COMPOSE_FILE), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def resolved(*profiles: str, variables: dict[str, str] | None = None) -> dict:
    """`docker-compose [--profile P] config`: the interpolated, validated configuration."""
    args = [a for p in profiles for a in ("--profile", p)]
    r = compose(*args, "config", variables=variables)
    assert r.returncode == 0, f"docker-compose config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def enabled_services(config: dict, profiles: set[str]) -> set[str]:
    """The compose specification's rule: a service without `profiles` always starts, one with
    profiles only when one of them is enabled."""
    return {name for name, s in config["services"].items()
            if not s.get("profiles") or profiles & set(s["profiles"])}


def command_argv(value) -> list[str]:
    """A service's command as compose runs it: a list as is, a string split like a shell."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else shlex.split(value)


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each `ports` entry of the resolved config."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):   # long syntax
            out.append((p.get("host_ip", ""), int(p["published"]), int(p["target"])))
            continue
        spec = str(p).split("/")[0]
        parts = spec.rsplit(":", 2)
        assert len(parts) == 3, f"port {p!r} has no host address: it would bind every interface"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def image_workdir() -> str:
    """The harness image's WORKDIR (the services' working folder, holding locustfiles/)."""
    text = (REPO / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    assert re.search(r"^COPY\s+locustfiles\s+\./locustfiles\s*$", text, re.M)
    return workdir


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@needs_compose
def test_compose_file_validates_and_defaults_to_the_simulator():
    config = resolved()
    assert set(config["services"]) == DEFAULT_SERVICES | {"vllm"}
    assert enabled_services(config, set()) == DEFAULT_SERVICES
    profiles = compose("config", "--profiles")
    assert profiles.returncode == 0, profiles.stderr
    assert profiles.stdout.split() == ["gpu"]
    sim = config["services"]["simulator"]
    argv = command_argv(sim["command"])
    assert argv[:2] == ["harness", "sim"]
    assert flag_value(argv, "--host") == "0.0.0.0" and flag_value(argv, "--port") == "8000"
    assert "build" in sim and "deploy" not in sim   # our image, no GPU
    master = config["services"]["locust-master"]
    assert master["environment"]["LOCUST_HOST"] == "http://simulator:8000"
    assert master["depends_on"]["simulator"]["condition"] == "service_healthy"
    # the three harness services share one image, built from our Dockerfile
    images = {config["services"][s]["image"] for s in ("simulator", "locust-master", "locust-worker")}
    assert images == {"llm-harness:latest"}
    for s in ("simulator", "locust-master", "locust-worker"):
        assert Path(config["services"][s]["build"]["context"]) == REPO
    assert (REPO / "Dockerfile").exists()


@needs_compose
def test_gpu_profile_runs_vllm_with_a_gpu_reservation():
    config = resolved("gpu", variables={"VLLM_MODEL": "meta-llama/Meta-Llama-3-70B-Instruct",
                                        "VLLM_TENSOR_PARALLEL_SIZE": "2", "VLLM_GPU_COUNT": "2",
                                        "VLLM_EXTRA_ARGS": "--quantization awq --enable-prefix-caching",
                                        "LLM_TARGET": "http://vllm:8000"})
    assert enabled_services(config, {"gpu"}) == DEFAULT_SERVICES | {"vllm"}
    vllm = config["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    # "2" after interpolation: Compose v2 reads it as a number; docker-compose 1.x only takes "all"
    assert devices == [{"driver": "nvidia", "count": "2", "capabilities": ["gpu"]}]
    argv = vllm["entrypoint"] + command_argv(vllm["command"])
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(argv, "--model") == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert flag_value(argv, "--tensor-parallel-size") == "2"
    assert flag_value(argv, "--quantization") == "awq" and "--enable-prefix-caching" in argv
    assert flag_value(argv, "--host") == "0.0.0.0" and flag_value(argv, "--port") == "8000"
    assert config["services"]["locust-master"]["environment"]["LOCUST_HOST"] == "http://vllm:8000"
    # by default every GPU of the host: the device request docker-compose itself would send
    default = resolved("gpu")["services"]["vllm"]
    assert compose_device_requests(default) == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]


def compose_device_requests(service: dict) -> list:
    """docker-compose's own translation of `deploy.resources.reservations.devices` into the
    Docker engine's DeviceRequests (what `up` sends; count -1 = all), run in its interpreter."""
    interpreter = Path(DOCKER_COMPOSE).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
    code = ("import json, sys\n"
            "from compose.project import Project\n"
            "print(json.dumps(Project.get_device_requests(None, json.loads(sys.argv[1]))))\n")
    r = subprocess.run([*interpreter, "-c", code, json.dumps(service)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_compose
def test_host_ports_bind_loopback_by_default_and_never_collide():
    config = resolved("gpu")
    seen: dict[int, str] = {}
    for name, service in config["services"].items():
        for host_ip, host_port, _ in published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} on {host_ip!r}"
            assert host_port not in seen, f"{name} and {seen.get(host_port)} both publish {host_port}"
            seen[host_port] = name
    assert {8089, 8000, 9090, 3000} <= set(seen)
    opened = resolved(variables={"BIND_ADDRESS": "0.0.0.0", "LOCUST_MASTER_BIND_ADDRESS": "0.0.0.0"})
    for name, service in opened["services"].items():
        for host_ip, _, _ in published(service):
            assert host_ip == "0.0.0.0", name


@needs_compose
def test_workers_scale_and_point_at_the_master():
    config = resolved()
    worker, master = config["services"]["locust-worker"], config["services"]["locust-master"]
    # `--scale locust-worker=N` needs no fixed container name and no fixed host port
    assert "container_name" not in worker and not worker.get("ports")
    w, m = command_argv(worker["command"]), command_argv(master["command"])
    assert "--worker" in w and "--master" in m
    assert flag_value(w, "--master-host") == "locust-master"
    assert flag_value(w, "--master-port") == flag_value(m, "--master-bind-port") == "5557"
    assert flag_value(w, "-f") == flag_value(m, "-f") == "locustfiles/chat.py"
    assert (REPO / flag_value(m, "-f")).exists()
    # the master's ZeroMQ port is published for workers on other machines (loopback by default)
    assert ("127.0.0.1", 5557, 5557) in published(master)
    # workers write requests.jsonl into the same results folder as the master
    assert worker["volumes"] == master["volumes"]


def locust_parse(argv: list[str], env: dict[str, str]) -> dict:
    """Locust's own parser (with our locustfile's options) over a command and environment,
    in a child process (importing Locust patches gevent into the interpreter)."""
    code = (
        "import json, sys\n"
        "import locust.main\n"
        "from locust.argument_parser import get_parser, parse_locustfile_option\n"
        "argv = json.loads(sys.argv[1])\n"
        "files = locust.main.get_locustfiles_locally(parse_locustfile_option(argv))\n"
        "locust.main.merge_locustfiles_content(files)\n"
        "o = get_parser().parse_args(argv)\n"
        "print(json.dumps({k: v for k, v in vars(o).items() if isinstance(v, (str, int, float, bool, type(None)))}))\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=REPO, env={**clean, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_compose
@pytest.mark.parametrize("headless", ["", "true"])
def test_master_command_parses_headless_or_ui_by_variable(headless):
    variables = {"LOCUST_HEADLESS": headless, "LLM_RATE": "2.5", "LLM_SLO": "ttft_p99_ms<=200,error_rate<=0.01"}
    variables = {k: v for k, v in variables.items() if v}
    master = resolved(variables=variables)["services"]["locust-master"]
    argv = command_argv(master["command"])[1:]   # without the program name
    env = {k: str(v) for k, v in master["environment"].items()}
    o = locust_parse(argv, env)
    assert o["headless"] is bool(headless)
    assert o["master"] and o["master_bind_port"] == 5557 and o["web_port"] == 8089
    assert o["host"] == "http://simulator:8000"
    assert o["llm_metrics_port"] == 9646 and o["llm_metrics_host"] == "0.0.0.0"
    assert o["llm_rate"] == 2.5 and o["llm_slo"] == "ttft_p99_ms<=200,error_rate<=0.01"
    assert o["llm_model"] == "" and o["llm_out"] == "runs/compose"
    assert o["expect_workers"] == 1 and o["num_users"] == 8
    worker = resolved()["services"]["locust-worker"]
    w = locust_parse(command_argv(worker["command"])[1:], {k: str(v) for k, v in worker.get("environment", {}).items()})
    assert w["worker"] and w["master_host"] == "locust-master" and w["master_port"] == 5557


# -- Prometheus and Grafana files -----------------------------------------------------------------
def prometheus_targets(config: dict) -> dict[str, list[tuple[str, int, dict]]]:
    """job -> [(host, port, static labels)]"""
    out: dict[str, list] = {}
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host, port = t.rsplit(":", 1)
                out.setdefault(job["job_name"], []).append((host, int(port), sc.get("labels", {})))
    return out


@needs_promtool
def test_prometheus_config_passes_promtool():
    r = subprocess.run([PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


@needs_compose
def test_prometheus_scrapes_what_the_services_serve():
    config = resolved("gpu")
    services = config["services"]
    targets = prometheus_targets(yaml.safe_load(PROM_CONFIG.read_text()))
    assert targets["llm-harness"] == [("locust-master", 9646, {})]
    m = command_argv(services["locust-master"]["command"])
    assert flag_value(m, "--llm-metrics-port") == "9646" and flag_value(m, "--llm-metrics-host") == "0.0.0.0"
    by_server = {labels["server"]: (host, port) for host, port, labels in targets["llm-server"]}
    assert by_server == {"simulator": ("simulator", 8000), "vllm": ("vllm", 8000)}
    s = command_argv(services["simulator"]["command"])
    assert flag_value(s, "--port") == "8000" and flag_value(s, "--host") == "0.0.0.0"
    v = command_argv(services["vllm"]["command"])
    assert flag_value(v, "--port") == "8000" and flag_value(v, "--host") == "0.0.0.0"
    # the compose service mounts this very file where --config.file says
    prom = services["prometheus"]
    conf_path = flag_value(prom["command"], "--config.file")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert Path(mounts[conf_path]) == PROM_CONFIG


def mounts_of(service: dict) -> dict[str, str]:
    """container path -> host path (bind mounts) or volume name."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


@needs_compose
def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = resolved()["services"]["grafana"]
    mounts = mounts_of(grafana)
    assert Path(mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    prom_listen = flag_value(resolved()["services"]["prometheus"]["command"], "--web.listen-address")
    assert ds[0]["url"] == f"http://prometheus:{prom_listen.rsplit(':', 1)[1]}"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert Path(mounts[path]) == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    # every panel and query uses the provisioned data source
    uid = ds[0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip() and t["refId"]


# -- dashboard queries ------------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """Grafana's macros replaced as Grafana would (a range for $__rate_interval)."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)


def promql_metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, `by (...)` lists, function calls, keywords and numbers are gone."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue   # 1e-9, 0.5
        names.add(word)
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, server) (rate(vllm:time_to_first_token_seconds_bucket[5m])))'
    ) == {"vllm:time_to_first_token_seconds_bucket"}
    assert promql_metric_names('sum(rate(a_total{outcome="failed"}[1m])) / clamp_min(sum(rate(a_total[1m])), 1e-9)') == {"a_total"}
    assert promql_metric_names('up{job=~"x|y"}') == {"up"}
    assert promql_metric_names("max by (server) (vllm:kv_cache_usage_perc) and on() vector(1)") == {"vllm:kv_cache_usage_perc"}


def test_dashboard_covers_the_issue_panels():
    """TTFT/TPOT/ITL percentiles, tokens/s, errors, vLLM running/waiting requests and KV cache."""
    names = set().union(*(promql_metric_names(e) for _, e in dashboard_queries()))
    for needed in ("llm_harness_ttft_window_quantile_seconds", "llm_harness_tpot_window_quantile_seconds",
                   "llm_harness_itl_window_quantile_seconds", "llm_harness_output_tokens_total",
                   "llm_harness_request_errors_total", "vllm:num_requests_running",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert needed in names, needed
    for title, expr in dashboard_queries():
        assert promql_metric_names(expr), f"{title}: {expr} selects no metric"


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())]}]}
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def base_name(sample: str) -> str:
    return re.sub(r"(_bucket|_sum|_count|_total|_created)$", "", sample)


def test_dashboard_vllm_names_exist_in_real_vllm():
    """Each `vllm:` metric of the dashboard is one real vLLM defines (its V1 metrics source)."""
    venv = Path(os.environ.get("HARNESS_VLLM_VENV", REPO / ".venv-vllm"))
    pkgs = sorted(venv.glob("lib/python3*/site-packages/vllm/v1/metrics"))
    if not pkgs:
        pytest.skip(f"no vLLM installed in {venv} (make vllm-env builds it): cannot read vLLM's metric names")
    source = "\n".join(p.read_text(errors="replace") for p in pkgs[0].rglob("*.py"))
    defined = set(re.findall(r'name="(vllm:[A-Za-z0-9_:]+)"', source))
    used = {n for _, e in dashboard_queries() for n in promql_metric_names(e) if n.startswith("vllm:")}
    assert used
    missing = {n for n in used if base_name(n) not in defined and n not in defined}
    assert not missing, f"not defined by vLLM: {sorted(missing)}"


# -- the stack without Docker ----------------------------------------------------------------------
class Stack:
    """Runs services of the resolved compose file as processes on loopback."""

    def __init__(self, config: dict, prom_config: dict, tmp: Path):
        self.config, self.tmp = config, tmp
        # the image's working folder: locustfiles/ (copied into the image) and the folders
        # mounted below it (runs/), so relative paths in commands mean what they mean there
        self.workdir = image_workdir()
        self.app = tmp / "app"
        self.app.mkdir()
        (self.app / "locustfiles").symlink_to(REPO / "locustfiles")
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs: dict[str, Path] = {}
        # every port a service listens on (published ports, Prometheus targets) -> a free local port
        # (one block of consecutive free ports: separate free_port_block(1) calls may hand
        # out the same port twice, as nothing holds one until its service starts)
        keys: list[tuple[str, int]] = []
        for name, s in config["services"].items():
            keys += [(name, cport) for _, _, cport in published(s)]
        for job in prometheus_targets(prom_config).values():
            keys += [(host, port) for host, port, _ in job]
        keys = list(dict.fromkeys(keys))
        base = free_port_block(len(keys))
        self.endpoint: dict[tuple[str, int], int] = {k: base + i for i, k in enumerate(keys)}

    def started_port(self, port: int, services: set[str]) -> int:
        owners = [(s, p) for (s, p) in self.endpoint if p == port and s in services]
        assert len(owners) == 1, f"port {port} is ambiguous among {owners}"
        return self.endpoint[owners[0]]

    def localize(self, service: str, argv: list[str], started: set[str]) -> list[str]:
        """Service names -> 127.0.0.1, container ports -> local ports, container paths -> tmp."""
        mounts = mounts_of(self.config["services"][service])
        names = set(self.config["services"])

        def host_port(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            owner = service if host in ("0.0.0.0", "127.0.0.1", "localhost") else host
            return f"127.0.0.1:{self.endpoint[(owner, port)]}"

        def value(v: str, prev: str | None) -> str:
            if v in names or v == "0.0.0.0":
                return "127.0.0.1"
            if v.isdigit() and prev is not None and prev.endswith("port"):
                return str(self.started_port(int(v), started))
            v = re.sub(r"\b(0\.0\.0\.0|127\.0\.0\.1|localhost|[a-z][a-z0-9-]*):(\d+)\b",
                       lambda m: host_port(m) if (m.group(1) in names or m.group(1) in
                                                  ("0.0.0.0", "127.0.0.1", "localhost")) else m.group(0), v)
            for cpath in sorted(mounts, key=len, reverse=True):
                if v == cpath or v.startswith(cpath + "/"):
                    return str(self.local_path(service, cpath)) + v[len(cpath):]
            return v

        out, prev = [], None
        for a in argv:
            if a.startswith("--") and "=" in a:
                flag, v = a.split("=", 1)
                out.append(f"{flag}={value(v, flag)}")
            else:
                out.append(value(a, prev))
            prev = a
        return out

    def local_path(self, service: str, cpath: str) -> Path:
        host = mounts_of(self.config["services"][service])[cpath]
        if host.startswith("/") and Path(host).is_file():
            return Path(host)                     # a bind-mounted file (read-only config)
        local = self.tmp / "volumes" / Path(host).name   # named volumes and bind-mounted folders
        local.mkdir(parents=True, exist_ok=True)
        return local

    def start(self, service: str, argv: list[str], env: dict[str, str], tag: str = "") -> subprocess.Popen:
        name = service + tag
        for cpath in mounts_of(self.config["services"][service]):
            if cpath.startswith(self.workdir.rstrip("/") + "/"):
                link = self.app / cpath[len(self.workdir):].lstrip("/")
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(self.local_path(service, cpath))
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
        clean["PATH"] = f"{VENV_BIN}{os.pathsep}{clean.get('PATH', '')}"
        with open(log, "wb") as f:
            f.write(f"$ {shlex.join(argv)}\n".encode())   # the localized command, for failures
            f.flush()
            proc = subprocess.Popen(argv, cwd=self.app, env={**clean, **env}, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n" + p.read_text(errors="replace")[-3000:] for n, p in self.logs.items())


SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "summary": ("", "_sum", "_count"), "untyped": ("",)}


def exposed_names(text: str) -> set[str]:
    """The series names a /metrics text serves or declares (a declared counter family with no
    labels seen yet, e.g. errors by kind before the first error, still names its series)."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + suffix for suffix in SERIES_SUFFIXES.get(fam.type, ("",))}
    return names


STACK_VARIABLES = {
    "LOCUST_HEADLESS": "true", "LOCUST_EXPECT_WORKERS": "2", "LOCUST_USERS": "4", "LOCUST_SPAWN_RATE": "4",
    "LOCUST_RUN_TIME": "14s", "LLM_INPUT_LEN": "64", "LLM_OUTPUT_LEN": "32", "LLM_WINDOW": "3",
    "LLM_METRICS_LINGER": "4", "SIM_PROFILE": "h200-llama-3-8b-awq", "RUN_NAME": "stack",
    # a few server errors, so that the error panels have data, under an SLO that allows them
    # (the run's exit code stays 0)
    "SIM_EXTRA_ARGS": "--fault-http-500 0.05 --seed 7", "LLM_SLO": "error_rate<=0.5",
}
WORKERS = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if DOCKER_COMPOSE is None:
        pytest.skip("Debian's docker-compose package is not installed: the stack test runs the commands "
                    "it resolves from docker-compose.yml")
    tmp = tmp_path_factory.mktemp("compose-stack")
    config = resolved(variables=STACK_VARIABLES)
    prom_config = yaml.safe_load(PROM_CONFIG.read_text())
    st = Stack(config, prom_config, tmp)
    services = config["services"]
    started = {"simulator", "locust-master", "locust-worker"} | ({"prometheus"} if PROMETHEUS else set())
    info: dict = {"stack": st, "config": config, "prometheus": None}
    try:
        # simulator: its command, then its own healthcheck command until it passes
        sim = services["simulator"]
        st.start("simulator", st.localize("simulator", command_argv(sim["command"]), started), {})
        check = st.localize("simulator", sim["healthcheck"]["test"][1:], started)
        check[0] = sys.executable if check[0] == "python" else check[0]
        deadline = time.monotonic() + 30
        while subprocess.run(check, capture_output=True, timeout=10).returncode != 0:
            assert time.monotonic() < deadline, "simulator never healthy:\n" + st.tails()
            time.sleep(0.5)

        # prometheus: the service's command (the image's entrypoint is the prometheus binary), its
        # config with the targets mapped to loopback and a 1 s scrape interval (test time only)
        if PROMETHEUS:
            local = json.loads(json.dumps(prom_config))
            local["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
            for job in local["scrape_configs"]:
                for sc in job.get("static_configs", []):
                    sc["targets"] = [f"127.0.0.1:{st.endpoint[(t.rsplit(':', 1)[0], int(t.rsplit(':', 1)[1]))]}"
                                     for t in sc["targets"]]
            conf = tmp / "prometheus.yml"
            conf.write_text(yaml.safe_dump(local))
            argv = [PROMETHEUS] + st.localize("prometheus", list(services["prometheus"]["command"]), started)
            argv = [f"--config.file={conf}" if a.startswith("--config.file=") else a for a in argv]
            st.start("prometheus", argv, {})
            api = f"http://127.0.0.1:{st.endpoint[('prometheus', 9090)]}"
            deadline = time.monotonic() + 30
            while http_get(api + "/-/ready") is None:
                assert time.monotonic() < deadline, "prometheus not ready:\n" + st.tails()
                time.sleep(0.5)
            # it scrapes only once discovery first updates (~5.5 s after ready): wait for that,
            # so a short run and the "during the run" queries below are really scraped
            deadline = time.monotonic() + 30
            while not json.loads(http_get(f"{api}/api/v1/query?query=up") or "{}").get("data", {}).get("result"):
                assert time.monotonic() < deadline, "prometheus never scraped:\n" + st.tails()
                time.sleep(0.5)
            info["prometheus"] = api

        # Locust master, then the worker twice (docker compose up --scale locust-worker=2)
        master = services["locust-master"]
        info["run_started"] = time.time()
        env = {k: str(v) for k, v in master["environment"].items()}
        env = dict(zip(env, st.localize("locust-master", list(env.values()), started)))
        master_proc = st.start("locust-master", st.localize("locust-master", command_argv(master["command"]), started), env)
        worker = services["locust-worker"]
        wenv = {k: str(v) for k, v in worker.get("environment", {}).items()}
        for i in range(WORKERS):
            st.start("locust-worker", st.localize("locust-worker", command_argv(worker["command"]), started),
                     wenv, tag=f"-{i + 1}")

        # while it runs, read the exporter and the simulator as Prometheus would
        exporter = f"http://127.0.0.1:{st.endpoint[('locust-master', 9646)]}/metrics"
        sim_metrics = f"http://127.0.0.1:{st.endpoint[('simulator', 8000)]}/metrics"
        deadline = time.monotonic() + 60
        while True:
            text = http_get(exporter)
            if (text and re.search(r'llm_harness_requests_total\{outcome="ok"\} [1-9]', text)
                    and "llm_harness_ttft_window_quantile_seconds{" in text
                    and "llm_harness_generator_cpu_percent{" in text):
                info["exporter_text"], info["seen_at"] = text, time.time()
                break
            assert master_proc.poll() is None and time.monotonic() < deadline, \
                "the exporter never showed requests:\n" + st.tails()
            time.sleep(0.5)
        while (sim_text := http_get(sim_metrics)) is None:   # a 2 s timeout on a busy machine
            assert time.monotonic() < deadline, "the simulator's /metrics never answered:\n" + st.tails()
            time.sleep(0.5)
        info["sim_text"] = sim_text
        try:
            master_proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the headless master did not finish:\n" + st.tails()) from None
        info["master_rc"] = master_proc.returncode
        info["run_ended"] = time.time()   # after the exporter's linger: it is gone now
        for name, p in st.procs:
            if name.startswith("locust-worker"):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    raise AssertionError(
                        f"{name} did not quit with the master:\n" + st.tails()) from None
        out = flag_value(command_argv(master["command"]), "--llm-out")
        assert not out.startswith("/"), out   # relative: a plain checkout on another host writes there too
        results = (st.app / out).resolve()
        assert results.is_relative_to(tmp / "volumes")   # into the mounted folder, not the image
        info["results"] = results
        yield info
    finally:
        st.stop_all()


def prom_query(api: str, expr: str, at: float | None = None) -> list:
    q = {"query": expr}
    if at is not None:
        q["time"] = f"{at:.3f}"
    body = http_get(f"{api}/api/v1/query?{urllib.parse.urlencode(q)}", timeout=10)
    assert body is not None, f"query failed: {expr}"
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


def test_stack_headless_run_through_master_and_two_workers(stack):
    st = stack["stack"]
    assert stack["master_rc"] == 0, st.tails()
    summary = json.loads((stack["results"] / "summary.json").read_text())
    req = summary["requests"]
    assert req["completed"] > 0 and req["failed"] > 0 and set(req["errors_by_kind"]) == {"http_500"}
    assert summary["slo"]["passed"] and summary["generator"]["workers"] == WORKERS
    lines = [json.loads(x) for x in (stack["results"] / "requests.jsonl").read_text().splitlines()]
    # both workers wrote their requests into the shared results folder, with the master's
    # --llm-* options (the workers' own command has none) and the model the simulator serves
    assert len(lines) == req["completed"] + req["failed"] + req["incomplete"]
    assert {(x["input_tokens"], x["output_tokens"]) for x in lines if x["ok"]} == {(64, 32)}
    assert {x["model"] for x in lines} == {"llama-3-8b-instruct"}
    assert "llm_harness_workers 2.0" in stack["exporter_text"]


def test_stack_dashboard_names_are_exposed(stack):
    """Every metric a dashboard query names is one the harness exporter or the server really
    served during the run (or one Prometheus makes for each target)."""
    exposed = exposed_names(stack["exporter_text"]) | exposed_names(stack["sim_text"]) | PROMETHEUS_SERIES
    for title, expr in dashboard_queries():
        missing = promql_metric_names(expr) - exposed
        assert not missing, f"panel {title!r}: {sorted(missing)} not exposed ({expr})"


def test_stack_prometheus_scraped_the_exporter_and_the_simulator(stack):
    api = stack["prometheus"]
    if api is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install -y prometheus)")
    def highest(expr: str) -> float:
        result = prom_query(api, f"max_over_time({expr}[5m])")
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    assert highest('up{job="llm-harness"}') == 1           # the harness exporter (Locust master)
    assert highest('up{job="llm-server",server="simulator"}') == 1
    assert highest('up{job="llm-server",server="vllm"}') == 0   # gpu profile not running: down, as in compose
    summary = json.loads((stack["results"] / "summary.json").read_text())
    assert highest('llm_harness_requests_total{outcome="ok"}') == summary["requests"]["completed"]
    assert highest('llm_harness_requests_total{outcome="failed"}') == summary["requests"]["failed"]
    assert highest("llm_harness_workers") == WORKERS
    assert highest('vllm:generation_tokens_total{server="simulator"}') > 0
    assert highest('vllm:num_requests_running{server="simulator"}') > 0


def prom_query_range(api: str, expr: str, start: float, end: float, step: float = 1.0) -> list:
    """What a Grafana panel asks for: `expr` evaluated every `step` s over [start, end]."""
    q = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)}
    body = http_get(f"{api}/api/v1/query_range?{urllib.parse.urlencode(q)}", timeout=10)
    assert body is not None, f"query failed: {expr}"
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


def test_stack_every_dashboard_query_returns_data(stack):
    api = stack["prometheus"]
    if api is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install -y prometheus)")
    # Each panel over the run, as Grafana draws it (a range query), not at one guessed instant:
    # a series that appears only with its first event (errors by kind) has no two samples in a
    # [10s] rate window yet at a fixed "first requests + 2 s" on a slower machine.
    empty = []
    for title, expr in dashboard_queries():
        result = prom_query_range(api, grafana_to_promql(expr, "10s"), stack["run_started"],
                                  stack["run_ended"])
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
