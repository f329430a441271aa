"""Assertions on the charts' rendered YAML for what a schema validator cannot see.

Each test renders with the real helm binary (HELM, set by scripts/helm_check.sh)
and checks that the pieces agree with each other: probes and container ports
against the flags in the container's args, the Service and ServiceMonitor
against the pod, shared memory and sockets between a sidecar and its app.
"""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shoal"
SIDECAR_VALUES = CHART / "values-sidecar.yaml"
FULL_VALUES = ROOT / "helm" / "tests" / "values-full.yaml"
EXAMPLE = ROOT / "helm" / "examples" / "kafka-consumer-sidecar"
NAMESPACE = "demo"


def helm_bin():
    helm = os.environ.get("HELM")
    if not helm or not os.access(helm, os.X_OK):
        pytest.fail("HELM must name the helm binary; run scripts/helm_check.sh")
    return helm


def helm_template(chart, values=(), sets=()):
    cmd = [helm_bin(), "template", "shoal", str(chart), "-n", NAMESPACE,
           "--kube-version", "1.32.0", "--api-versions", "monitoring.coreos.com/v1"]
    for v in values:
        cmd += ["-f", str(v)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True)


def render(chart=CHART, values=(), sets=()):
    """Rendered objects, keyed by kind (each kind appears at most once in these charts)."""
    out = helm_template(chart, values, sets)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def render_error(sets, values=(), chart=CHART):
    out = helm_template(chart, values, sets)
    assert out.returncode != 0, f"rendered although it should not:\n{out.stdout}"
    return out.stderr


def pod(objs):
    return objs["Deployment"]["spec"]["template"]["spec"]


def all_containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def shoal_container(spec):
    found = [c for c in all_containers(spec) if c["name"] == "shoal"]
    assert len(found) == 1, [c["name"] for c in all_containers(spec)]
    return found[0]


def flags(container):
    """--flag=value args as a dict; a flag given twice fails (clap would refuse it)."""
    out = {}
    for arg in container["args"]:
        assert arg.startswith("--"), arg
        name, _, value = arg.partition("=")
        assert name not in out, f"{name} given twice"
        out[name] = value
    return out


def port_number(container, port):
    """A probe's port (a name or a number) as the number it reaches."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in by_name, f"port {port!r} names no container port"
    return by_name[port]


def mounts(container):
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volumes(spec):
    return {v["name"]: v for v in spec["volumes"]}


ALL_RENDERS = {
    "standalone": lambda: render(),
    "sidecar": lambda: render(values=[SIDECAR_VALUES]),
    "full": lambda: render(values=[FULL_VALUES]),
    "example": lambda: render(EXAMPLE),
    "sidecar-not-native": lambda: render(values=[SIDECAR_VALUES], sets=["sidecar.native=false"]),
}


# --- standalone ---------------------------------------------------------------------


def test_standalone_binds_all_interfaces_so_the_service_reaches_it():
    assert flags(shoal_container(pod(render())))["--bind"] == "0.0.0.0"


def test_bind_can_be_overridden():
    assert flags(shoal_container(pod(render(sets=["bind=::"]))))["--bind"] == "::"


@pytest.mark.parametrize("sets", [[], ["ports.http=9100", "ports.grpc=9101", "ports.metrics=9102"]])
def test_container_ports_match_the_args(sets):
    c = shoal_container(pod(render(sets=sets)))
    f = flags(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "http": int(f["--http-port"]),
        "grpc": int(f["--grpc-port"]),
        "metrics": int(f["--metrics-port"]),
    }
    if sets:
        assert ports["http"] == 9100


@pytest.mark.parametrize("which,flag", [("http", "--http-port"), ("metrics", "--metrics-port")])
@pytest.mark.parametrize("http_port", [8000, 9200])
def test_probes_hit_the_health_paths_on_the_port_in_the_args(which, flag, http_port):
    c = shoal_container(pod(render(sets=[f"probes.port={which}", f"ports.http={http_port}"])))
    want = int(flags(c)[flag])
    expected = {
        "startupProbe": "/v2/health/live",
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == want, probe
    if which == "http":
        assert want == http_port


def test_service_exposes_http_grpc_and_metrics_and_selects_the_pod():
    objs = render()
    svc = objs["Service"]["spec"]
    c = shoal_container(pod(objs))
    f = flags(c)
    by_name = {p["name"]: p for p in svc["ports"]}
    assert set(by_name) == {"http", "grpc", "metrics"}
    for name, flag in [("http", "--http-port"), ("grpc", "--grpc-port"), ("metrics", "--metrics-port")]:
        assert port_number(c, by_name[name]["targetPort"]) == int(f[flag])
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_no_service_monitor_unless_asked():
    assert "ServiceMonitor" not in render()


def test_service_monitor_scrapes_the_metrics_port_of_the_service():
    objs = render(sets=["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom",
                        "ports.metrics=9302", "serviceMonitor.interval=20s"])
    sm = objs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    spec = sm["spec"]
    svc = objs["Service"]
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    [endpoint] = spec["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "20s"
    svc_port = {p["name"]: p for p in svc["spec"]["ports"]}[endpoint["port"]]
    c = shoal_container(pod(objs))
    assert port_number(c, svc_port["targetPort"]) == int(flags(c)["--metrics-port"]) == 9302


def test_gpu_resources_only_when_asked():
    plain = shoal_container(pod(render()))
    assert "nvidia.com/gpu" not in str(plain["resources"])
    asked = shoal_container(pod(render(sets=["gpu.count=2"])))
    assert asked["resources"]["limits"]["nvidia.com/gpu"] == 2
    # the other limits and requests stay
    assert asked["resources"]["limits"]["memory"] == plain["resources"]["limits"]["memory"]
    assert asked["resources"]["requests"] == plain["resources"]["requests"]
    none_at_all = shoal_container(pod(render(sets=["resources=null", "gpu.count=1"])))
    assert none_at_all["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_model_repository_from_a_volume_is_mounted_read_only_at_the_flag_path():
    spec = pod(render(sets=["modelRepository.path=/srv/models"]))
    c = shoal_container(spec)
    assert flags(c)["--model-repository"] == "/srv/models"
    [m] = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert m["mountPath"] == "/srv/models" and m["readOnly"] is True
    assert volumes(spec)["models"]["persistentVolumeClaim"]["claimName"] == "shoal-models"
    assert "initContainers" not in spec


def test_model_repository_from_an_init_container_fills_an_empty_dir_first():
    spec = pod(render(values=[FULL_VALUES]))
    [init] = spec["initContainers"]
    assert init["name"] == "model-repository"
    assert mounts(init)["/models"] == "models"
    assert volumes(spec)["models"]["emptyDir"] == {"sizeLimit": "4Gi"}
    c = shoal_container(spec)
    assert mounts(c)[flags(c)["--model-repository"]] == "models"


def test_grace_period_outlasts_the_shutdown_timeout():
    spec = pod(render(sets=["shutdownTimeoutSecs=45"]))
    assert flags(shoal_container(spec))["--shutdown-timeout-secs"] == "45"
    assert spec["terminationGracePeriodSeconds"] == 55


def test_no_service_links_or_token_in_the_pod():
    for name, make in ALL_RENDERS.items():
        spec = pod(make())
        assert spec["enableServiceLinks"] is False, name
        assert spec["automountServiceAccountToken"] is False, name


def test_shared_memory_in_standalone_only_when_asked():
    spec = pod(render())
    assert "shm" not in volumes(spec)
    assert "/dev/shm" not in mounts(shoal_container(spec))
    spec = pod(render(sets=["sharedMemory.enabled=true"]))
    assert volumes(spec)["shm"]["emptyDir"]["medium"] == "Memory"
    assert mounts(shoal_container(spec))["/dev/shm"] == "shm"


def test_optional_flags_are_rendered_only_when_set():
    f = flags(shoal_container(pod(render())))
    for absent in ["--model-control-mode", "--grpc-uds", "--http-uds"]:
        assert absent not in f
    spec = pod(render(values=[FULL_VALUES]))
    c = shoal_container(spec)
    f = flags(c)
    assert f["--model-control-mode"] == "poll"
    assert f["--grpc-uds"] == "/run/shoal/grpc.sock"
    assert f["--http-uds"] == "/run/shoal/http.sock"
    # the socket directory is writable: an emptyDir under the read-only root
    assert mounts(c)["/run/shoal"] == "sockets"
    assert "emptyDir" in volumes(spec)["sockets"]
    # extraArgs come last, verbatim
    assert c["args"][-2:] == ["--max-body-bytes=134217728", "--worker-threads=4"]


# --- every render -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_RENDERS))
def test_security_context_non_root_read_only(name):
    spec = pod(ALL_RENDERS[name]())
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    for c in all_containers(spec):
        sc = c.get("securityContext", {})
        if c["name"] in ("shoal", "model-repository", "consumer"):
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["runAsUser"] != 0, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        # with a read-only root, /tmp must be a volume
        if c["name"] in ("shoal", "model-repository"):
            assert mounts(c)["/tmp"] == "tmp"
            assert "emptyDir" in volumes(spec)["tmp"]


@pytest.mark.parametrize("name", sorted(ALL_RENDERS))
def test_every_mount_names_a_volume(name):
    spec = pod(ALL_RENDERS[name]())
    names = set(volumes(spec))
    for c in all_containers(spec):
        for m in c.get("volumeMounts", []):
            assert m["name"] in names, (c["name"], m)


# --- sidecar --------------------------------------------------------------------------


def check_sidecar_pod(spec, app_name):
    c = shoal_container(spec)
    f = flags(c)
    assert f["--bind"] == "127.0.0.1"
    # kubelet probes reach the pod IP, which a loopback bind does not answer
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe not in c
    shm = volumes(spec)["shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes(spec)["sockets"]
    [app] = [a for a in spec["containers"] if a["name"] == app_name]
    for container in (app, c):
        assert mounts(container)["/dev/shm"] == "shm", container["name"]
        assert mounts(container)["/run/shoal"] == "sockets", container["name"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["SHOAL_GRPC_ADDRESS"] == f"127.0.0.1:{f['--grpc-port']}"
    assert env["SHOAL_HTTP_URL"] == f"http://127.0.0.1:{f['--http-port']}"
    return c, app


def test_sidecar_values_put_shoal_beside_the_app_as_a_native_sidecar():
    objs = render(values=[SIDECAR_VALUES])
    assert set(objs) == {"Deployment"}  # no Service: only the pod's app talks to shoal
    spec = pod(objs)
    c, _ = check_sidecar_pod(spec, "processor")
    assert c in spec["initContainers"]
    assert c["restartPolicy"] == "Always"
    assert [x["name"] for x in spec["containers"]] == ["processor"]


def test_sidecar_as_a_plain_container():
    spec = pod(render(values=[SIDECAR_VALUES], sets=["sidecar.native=false"]))
    c, _ = check_sidecar_pod(spec, "processor")
    assert "restartPolicy" not in c
    assert [x["name"] for x in spec["containers"]] == ["processor", "shoal"]
    assert "initContainers" not in spec


def test_sidecar_model_init_container_runs_before_the_native_sidecar():
    spec = pod(render(values=[SIDECAR_VALUES], sets=[
        "modelRepository.initContainer.enabled=true",
        "modelRepository.initContainer.image=example.com/models:1"]))
    assert [x["name"] for x in spec["initContainers"]] == ["model-repository", "shoal"]


def test_sidecar_bound_beyond_loopback_gets_probes():
    c = shoal_container(pod(render(values=[SIDECAR_VALUES], sets=["bind=0.0.0.0"])))
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == int(flags(c)["--http-port"])


def test_sidecar_gets_the_unix_socket_path_in_its_environment():
    spec = pod(render(values=[SIDECAR_VALUES], sets=["grpcUds=/run/shoal/grpc.sock"]))
    [app] = spec["containers"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["SHOAL_GRPC_UDS"] == flags(shoal_container(spec))["--grpc-uds"] == "/run/shoal/grpc.sock"


def test_kafka_consumer_example():
    objs = render(EXAMPLE)
    assert set(objs) == {"Deployment"}  # the shoal subchart renders nothing of its own
    dep = objs["Deployment"]
    assert dep["spec"]["replicas"] == 6  # one pod per partition
    spec = pod(objs)
    c, consumer = check_sidecar_pod(spec, "consumer")
    assert c["restartPolicy"] == "Always" and c in spec["initContainers"]
    env = {e["name"]: e.get("value") for e in consumer["env"]}
    assert env["KAFKA_TOPIC"] == "transactions"
    assert env["KAFKA_GROUP_ID"] == "fraud-scorer"
    assert render(EXAMPLE, sets=["kafka.partitions=12"])["Deployment"]["spec"]["replicas"] == 12
    assert render(EXAMPLE, sets=["consumer.replicas=2"])["Deployment"]["spec"]["replicas"] == 2


# --- bad values fail at render time, saying why ------------------------------------------


@pytest.mark.parametrize("sets,values,message", [
    (["extraArgs={--bind=0.0.0.0}"], [], "extraArgs: --bind is set by the chart"),
    (["extraArgs={--http-port,9000}"], [], "extraArgs: --http-port is set by the chart"),
    (["modelControlMode=sometimes"], [], "modelControlMode: modelControlMode must be one of"),
    (["grpcUds=/tmp/grpc.sock"], [], "must lie in sidecar.socketDir"),
    (["mode=daemonset"], [], "mode: mode must be one of"),
    (["probes.port=grpc"], [], "probes.port: probes.port must be one of"),
    # values.schema.json: typos, ports the kubelet would refuse, wrong types
    (["serviceMonitor.enable=true"], [], "Additional property enable is not allowed"),
    (["ports.http=0"], [], "ports.http: Must be greater than or equal to 1"),
    (["ports.grpc=70000"], [], "ports.grpc: Must be less than or equal to 65535"),
    (["gpu.count=-1"], [], "gpu.count: Must be greater than or equal to 0"),
    (["modelRepository.path=models"], [], "modelRepository.path: Does not match pattern"),
    (["modelRepository.initContainer.enabled=true"], [], "initContainer.image is required"),
    (["modelRepository.volume=null"], [], "shoal needs a model repository"),
    (["sidecar.app=null"], [SIDECAR_VALUES], "sidecar.app"),
    (["serviceMonitor.enabled=true"], [SIDECAR_VALUES], "a sidecar has no Service to monitor"),
    (["sidecar.app.ports[0].containerPort=8001"], [SIDECAR_VALUES], "8001 is also one of shoal's ports"),
])
def test_bad_values_fail_with_a_reason(sets, values, message):
    assert message in render_error(sets, values)


def test_extra_args_that_merely_start_like_a_managed_flag_pass():
    f = flags(shoal_container(pod(render(sets=["extraArgs={--bind-something=1}"]))))
    assert f["--bind-something"] == "1"
