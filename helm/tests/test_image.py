"""The Dockerfile and the chart agree: user, ports, ONNX Runtime version, app version.

The image cannot be built here (no container engine), so what ties it to the
chart and to the rest of the repository is checked as text.
"""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VALUES = yaml.safe_load((ROOT / "helm" / "shoal" / "values.yaml").read_text())
CHART = yaml.safe_load((ROOT / "helm" / "shoal" / "Chart.yaml").read_text())


def instructions(name):
    return re.findall(rf"^{name}\s+(.+)$", DOCKERFILE, flags=re.MULTILINE)


def test_user_is_numeric_non_root_and_the_chart_runs_as_it():
    [user] = instructions("USER")
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    assert VALUES["podSecurityContext"]["runAsUser"] == uid
    assert VALUES["podSecurityContext"]["runAsGroup"] == gid
    assert VALUES["securityContext"]["runAsUser"] == uid


def test_exposed_ports_are_the_chart_defaults():
    [expose] = instructions("EXPOSE")
    assert sorted(int(p) for p in expose.split()) == sorted(VALUES["ports"].values())


def test_onnxruntime_version_is_the_one_the_tests_use():
    [arg] = [a for a in instructions("ARG") if a.startswith("ORT_VERSION=")]
    pin = re.search(r"^onnxruntime==(\S+)$", (ROOT / "models" / "requirements.txt").read_text(), re.MULTILINE)
    assert arg == f"ORT_VERSION={pin.group(1)}"
    assert "ORT_DYLIB_PATH=/usr/local/lib/shoal/libonnxruntime.so.${ORT_VERSION}" in DOCKERFILE


def test_final_stage_is_slim_and_runs_shoal():
    froms = instructions("FROM")
    assert froms[-1] == "debian:bookworm-slim"
    assert any(f.startswith("rust:") and f.endswith(" AS build") for f in froms)
    [entry] = instructions("ENTRYPOINT")
    assert entry == '["/usr/local/bin/shoal"]'
    assert "cargo build --release --locked -p shoal --bin shoal" in DOCKERFILE


def test_chart_app_version_is_the_workspace_version():
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert CHART["appVersion"] == cargo["workspace"]["package"]["version"]
    assert VALUES["image"]["repository"] == "shoal" and VALUES["image"]["tag"] == ""


def test_dockerignore_keeps_build_outputs_and_models_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in ["target/", "**/*.onnx", "model_repository/", ".git/"]:
        assert pattern in ignored
