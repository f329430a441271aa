"""Assertions on the charts' rendered YAML for what a schema validator cannot see.

Each test renders with the real helm binary (HELM, set by scripts/helm_check.sh)
and checks that the pieces agree with each other: probes and container ports
against the flags in the container's args, the Service and ServiceMonitor
against the pod, shared memory and sockets between a sidecar and its app.
"""

import json
import os
import re
import socket
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
# The binary in the image (Dockerfile: COPY ... /usr/local/bin/shoal, its ENTRYPOINT).
SHOAL_BIN = "/usr/local/bin/shoal"


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


def healthcheck_url(container, probe):
    """The URL of an exec probe running `shoal healthcheck --url URL --timeout-ms MS`."""
    command = container[probe]["exec"]["command"]
    assert "httpGet" not in container[probe], probe
    assert command[:3] == [SHOAL_BIN, "healthcheck", "--url"], command
    assert command[4] == "--timeout-ms" and len(command) == 6, command
    assert all(isinstance(x, str) for x in command), command
    return command[3]


# What each probe asks for: liveness and startup /v2/health/live, readiness /v2/health/ready.
PROBE_PATHS = {
    "startupProbe": "/v2/health/live",
    "livenessProbe": "/v2/health/live",
    "readinessProbe": "/v2/health/ready",
}


def check_exec_probes(container, host="127.0.0.1"):
    """Every probe is an exec healthcheck of the metrics port in the args, plain HTTP."""
    port = int(flags(container)["--metrics-port"])
    for probe, path in PROBE_PATHS.items():
        assert healthcheck_url(container, probe) == f"http://{host}:{port}{path}", probe


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
    # kubelet httpGet probes reach the pod IP, which a loopback bind does not answer:
    # the probes run `shoal healthcheck` inside the container instead
    check_exec_probes(c)
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


@pytest.mark.parametrize("name", ["sidecar", "sidecar-not-native", "example"])
def test_sidecar_probes_are_exec_healthchecks_on_the_metrics_port(name):
    c = shoal_container(pod(ALL_RENDERS[name]()))
    check_exec_probes(c)
    assert healthcheck_url(c, "livenessProbe") == "http://127.0.0.1:8002/v2/health/live"
    assert healthcheck_url(c, "readinessProbe") == "http://127.0.0.1:8002/v2/health/ready"


@pytest.mark.parametrize("chart,values,prefix", [
    (CHART, [SIDECAR_VALUES], ""),
    (EXAMPLE, [], "shoal."),
])
def test_sidecar_exec_probes_follow_a_non_default_metrics_port(chart, values, prefix):
    sets = [f"{prefix}ports.metrics=9402", f"{prefix}ports.http=9400"]
    c = shoal_container(pod(render(chart, values=values, sets=sets)))
    assert flags(c)["--metrics-port"] == "9402"
    check_exec_probes(c)
    assert healthcheck_url(c, "readinessProbe") == "http://127.0.0.1:9402/v2/health/ready"
    # not the HTTP port, whatever probes.port says: httpGet's choice, not exec's
    c = shoal_container(pod(render(chart, values=values, sets=sets + [f"{prefix}probes.port=http"])))
    check_exec_probes(c)


def test_exec_probes_keep_the_probe_timings_and_give_up_before_the_kubelet():
    c = shoal_container(pod(render(values=[SIDECAR_VALUES], sets=[
        "probes.liveness.timeoutSeconds=5", "probes.readiness.timeoutSeconds=1",
        "probes.liveness.periodSeconds=7"])))
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["timeoutSeconds"] == 5 and live["periodSeconds"] == 7
    assert live["exec"]["command"][-1] == "4800"
    assert ready["exec"]["command"][-1] == "800"
    assert c["startupProbe"]["failureThreshold"] == 60


def test_exec_probe_binary_is_the_images_entrypoint():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'ENTRYPOINT ["{SHOAL_BIN}"]' in dockerfile
    assert re.search(rf"^COPY --from=build \S+ {re.escape(SHOAL_BIN)}$", dockerfile, re.MULTILINE)


@pytest.mark.parametrize("bind,host", [("::1", "[::1]"), ("127.0.0.2", "127.0.0.2")])
def test_exec_probes_dial_the_loopback_address_shoal_binds(bind, host):
    c = shoal_container(pod(render(values=[SIDECAR_VALUES], sets=[f"bind={bind}"])))
    check_exec_probes(c, host)


def test_probe_handler_can_be_chosen():
    # exec in standalone too (e.g. TLS on the HTTP port): dialled over loopback
    c = shoal_container(pod(render(sets=["probes.handler=exec"])))
    check_exec_probes(c)
    c = shoal_container(pod(render(sets=["probes.handler=exec", "bind=::"])))
    check_exec_probes(c, "[::1]")
    # httpGet explicitly, standalone: as auto
    assert shoal_container(pod(render(sets=["probes.handler=httpGet"])))["livenessProbe"] == \
        shoal_container(pod(render()))["livenessProbe"]
    # none: for an image without the healthcheck subcommand
    for values in ([], [SIDECAR_VALUES]):
        c = shoal_container(pod(render(values=values, sets=["probes.handler=none"])))
        for probe in PROBE_PATHS:
            assert probe not in c


def test_standalone_probes_stay_http_get():
    for make in (ALL_RENDERS["standalone"], ALL_RENDERS["full"]):
        c = shoal_container(pod(make()))
        for probe, path in PROBE_PATHS.items():
            assert "exec" not in c[probe], probe
            assert c[probe]["httpGet"]["path"] == path, probe


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


# --- Kafka-native serving --------------------------------------------------------------

KAFKA_VALUES = {
    "brokers": "kafka-0.kafka:9092,kafka-1.kafka:9092",
    "inputTopic": "transactions",
    "outputTopic": "scores",
    "errorTopic": "scores-dlq",
    "stateTopic": "fraud-state",
    "groupId": "fraud",
    "model": "ffnn:1",
    "inputFormat": "raw",
    "maxInFlight": 256,
}


def kafka_sets(values=KAFKA_VALUES, properties=(), secret=None):
    # --set splits on commas: the broker list's are escaped
    sets = [f"kafka.{k}={str(v).replace(',', chr(92) + ',')}" for k, v in values.items()]
    sets += [f"kafka.properties[{i}]={p}" for i, p in enumerate(properties)]
    if secret:
        sets += [f"kafka.propertiesSecret.name={secret[0]}", f"kafka.propertiesSecret.key={secret[1]}"]
    return sets


def kubelet_env(container, secrets=None):
    """The container's environment as the kubelet builds it: in order, each literal value
    with $(VAR) replaced by a variable defined before it (left as written otherwise) and $$
    read as $; a secretKeyRef's value from `secrets`, keyed by (secret, key)."""
    env = {}

    def expand(m):
        return "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0))

    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", expand, e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
    return env


@pytest.mark.parametrize("name", sorted(set(ALL_RENDERS) - {"full"}))
def test_kafka_native_serving_is_off_unless_asked(name):
    c = shoal_container(pod(ALL_RENDERS[name]()))
    assert not [a for a in c["args"] if a.startswith("--kafka")]
    assert not [e for e in c.get("env", []) if "KAFKA" in e["name"]]


def test_kafka_values_become_shoal_flags():
    f = flags(shoal_container(pod(render(sets=kafka_sets()))))
    assert {k: v for k, v in f.items() if k.startswith("--kafka")} == {
        "--kafka-brokers": "kafka-0.kafka:9092,kafka-1.kafka:9092",
        "--kafka-input-topic": "transactions",
        "--kafka-output-topic": "scores",
        "--kafka-error-topic": "scores-dlq",
        "--kafka-state-topic": "fraud-state",
        "--kafka-group-id": "fraud",
        "--kafka-model": "ffnn:1",
        "--kafka-input-format": "raw",
        "--kafka-max-in-flight": "256",
    }
    # only what is set: the rest is left to shoal's defaults
    minimal = {k: KAFKA_VALUES[k] for k in ("brokers", "inputTopic", "outputTopic")}
    f = flags(shoal_container(pod(render(sets=kafka_sets(minimal)))))
    assert sorted(k for k in f if k.startswith("--kafka")) == [
        "--kafka-brokers", "--kafka-input-topic", "--kafka-output-topic"]
    # the flags live in the shoal container, so a sidecar consumes too
    c = shoal_container(pod(render(values=[SIDECAR_VALUES], sets=kafka_sets(minimal))))
    assert flags(c)["--kafka-input-topic"] == "transactions"


def test_kafka_properties_reach_shoal_as_written_with_the_secrets_from_the_secret():
    props = ["security.protocol=SASL_SSL", "sasl.mechanism=SCRAM-SHA-512", "client.id=a$b$(HOME)"]
    secrets = {("kafka-creds", "properties"): "sasl.username=scorer;sasl.password=p$(x)"}
    c = shoal_container(pod(render(sets=kafka_sets(properties=props, secret=("kafka-creds", "properties")))))
    assert "--kafka-property" not in flags(c)  # clap would then ignore the variable
    # the Secret's value is never in the pod spec, only a reference to it
    assert "scorer" not in json.dumps(c)
    env = kubelet_env(c, secrets)
    assert env["SHOAL_KAFKA_PROPERTIES"].split(";") == props + [
        "sasl.username=scorer", "sasl.password=p$(x)"]
    # literal properties alone, or the Secret alone
    env = kubelet_env(shoal_container(pod(render(sets=kafka_sets(properties=props)))))
    assert env == {"SHOAL_KAFKA_PROPERTIES": ";".join(props)}
    c = shoal_container(pod(render(sets=kafka_sets(secret=("kafka-creds", "properties")))))
    assert kubelet_env(c, secrets)["SHOAL_KAFKA_PROPERTIES"] == secrets[("kafka-creds", "properties")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rendered_shoal(container, secrets, tmp_path):
    """Runs the real shoal (SHOAL_BIN) with a rendered container's args and environment, the
    model repository swapped for the FFNN alone and the ports for port 0 on loopback."""
    binary = os.environ.get("SHOAL_BIN")
    if not binary:
        pytest.skip("SHOAL_BIN names no shoal binary (scripts/test.sh sets it)")
    assert os.access(binary, os.X_OK), binary
    repo = tmp_path / "models"
    if not repo.exists():
        (repo / "ffnn").mkdir(parents=True)
        (repo / "ffnn" / "1").symlink_to(ROOT / "model_repository" / "ffnn" / "1")
        (repo / "ffnn" / "config.toml").write_text("")
    swap = {"--model-repository": str(repo), "--bind": "127.0.0.1",
            "--http-port": "0", "--grpc-port": "0", "--metrics-port": "0"}
    args = []
    for a in container["args"]:
        name = a.partition("=")[0]
        args.append(f"{name}={swap[name]}" if name in swap else a)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") or k == "SHOAL_HOME"}
    env.update(kubelet_env(container, secrets))
    return subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_rendered_kafka_flags_and_properties_are_what_the_real_shoal_takes(tmp_path):
    """shoal parses every rendered flag, accepts the Kafka configuration, loads the model
    the flags name and hands the properties to librdkafka; the broker, a port nobody
    listens on, is the first thing it cannot use."""
    port = free_port()
    values = dict(KAFKA_VALUES, brokers=f"127.0.0.1:{port}", model="ffnn", inputFormat="kserve")
    secret = ("kafka-creds", "properties")
    c = shoal_container(pod(render(sets=kafka_sets(values, ["client.id=chart$test"], secret))))
    out = run_rendered_shoal(c, {secret: "socket.timeout.ms=2000;reconnect.backoff.ms=50"}, tmp_path)
    assert out.returncode != 0
    assert f"kafka at 127.0.0.1:{port}: no broker answered" in out.stderr, out.stderr
    # a property librdkafka does not know, from the Secret, stops it before any broker
    out = run_rendered_shoal(c, {secret: "no.such.property=1"}, tmp_path)
    assert out.returncode != 0
    assert "no.such.property" in out.stderr and "no broker answered" not in out.stderr, out.stderr


# --- Grafana dashboard -----------------------------------------------------------------

DASHBOARD_FILE = CHART / "dashboards" / "shoal.json"


def dashboard_configmap(objs):
    cm = objs["ConfigMap"]
    assert list(cm["data"]) == ["shoal.json"]
    return cm, json.loads(cm["data"]["shoal.json"])


def targets(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


@pytest.mark.parametrize("name", sorted(set(ALL_RENDERS) - {"full"}))
def test_no_dashboard_unless_asked(name):
    assert "ConfigMap" not in ALL_RENDERS[name]()


def test_full_values_render_the_dashboard_where_asked():
    meta = dashboard_configmap(render(values=[FULL_VALUES]))[0]["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["annotations"] == {"grafana_folder": "Inference"}


def test_dashboard_config_map_carries_the_sidecar_label_and_the_dashboard():
    objs = render(sets=["grafanaDashboard.enabled=true"])
    cm, dashboard = dashboard_configmap(objs)
    meta = cm["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/instance"] == "shoal"
    assert meta["namespace"] == NAMESPACE
    assert "annotations" not in meta
    # the file verbatim, as JSON
    assert dashboard == json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] == "shoal"
    assert len(dashboard["panels"]) >= 10
    assert len(list(targets(dashboard))) >= 15


def test_dashboard_label_namespace_and_annotations_are_settable():
    objs = render(sets=["grafanaDashboard.enabled=true",
                        "grafanaDashboard.labels.grafana_dashboard=null",
                        "grafanaDashboard.labels.dashboards=shoal",
                        "grafanaDashboard.namespace=monitoring",
                        "grafanaDashboard.annotations.grafana_folder=Inference"])
    meta = dashboard_configmap(objs)[0]["metadata"]
    assert meta["labels"]["dashboards"] == "shoal"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["namespace"] == "monitoring"
    assert meta["annotations"] == {"grafana_folder": "Inference"}


def test_dashboard_from_a_parent_chart_and_as_a_sidecar():
    for objs in (render(EXAMPLE, sets=["shoal.grafanaDashboard.enabled=true"]),
                 render(values=[SIDECAR_VALUES], sets=["grafanaDashboard.enabled=true"])):
        assert set(objs) == {"Deployment", "ConfigMap"}
        assert dashboard_configmap(objs)[1]["uid"] == "shoal"


def test_dashboard_queries_are_well_formed():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    titles = set()
    for panel, target in targets(dashboard):
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        expr = target["expr"]
        assert "shoal_" in expr, panel["title"]
        assert expr.count("(") == expr.count(")"), expr
        if "histogram_quantile" in expr:
            # over the rates of a histogram's buckets, keeping le
            assert re.search(r"rate\(shoal_\w+_bucket\{", expr), expr
            assert re.search(r"by \([^)]*\ble\b", expr), expr
        for rated in re.findall(r"(?:rate|increase)\((shoal_\w+)", expr):
            assert rated.endswith(("_total", "_bucket", "_sum", "_count")), expr
        if "shoal_gpu" not in expr:  # the GPU series have no model label
            assert 'model=~"$model"' in expr, expr
    for want in ["Request rate", "Request latency p50 / p99", "Queue depth", "Batch size",
                 "Adaptive target batch size", "Shed, objective missed, deadline exceeded",
                 "GPU utilisation", "GPU memory"]:
        assert want in titles


def test_dashboard_metric_names_are_in_the_server_source():
    """The names, against the server's source; server/tests/dashboard.rs checks them
    against a scrape of the real binary (which needs a build)."""
    source = "\n".join(p.read_text() for p in (ROOT / "server" / "src").rglob("*.rs"))
    declared = set(re.findall(r'"(shoal_[a-z0-9_]+)"', source))
    for _, target in targets(json.loads(DASHBOARD_FILE.read_text())):
        for name in re.findall(r"\bshoal_[a-zA-Z0-9_:]+", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in declared or base in declared, (name, target["expr"])


# --- bad values fail at render time, saying why ------------------------------------------


@pytest.mark.parametrize("sets,values,message", [
    (["extraArgs={--bind=0.0.0.0}"], [], "extraArgs: --bind is set by the chart"),
    (["extraArgs={--http-port,9000}"], [], "extraArgs: --http-port is set by the chart"),
    (["modelControlMode=sometimes"], [], "modelControlMode: modelControlMode must be one of"),
    (["grpcUds=/tmp/grpc.sock"], [], "must lie in sidecar.socketDir"),
    (["mode=daemonset"], [], "mode: mode must be one of"),
    (["probes.port=grpc"], [], "probes.port: probes.port must be one of"),
    (["probes.handler=tcp"], [], "probes.handler: probes.handler must be one of"),
    (["probes.handler=httpGet"], [SIDECAR_VALUES], "httpGet cannot reach shoal bound to 127.0.0.1"),
    (["probes.handler=httpGet", "bind=::1"], [], "httpGet cannot reach shoal bound to ::1"),
    (["grafanaDashboard.enable=true"], [], "Additional property enable is not allowed"),
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
    # Kafka-native serving: what shoal would refuse at startup, refused at render time
    (["kafka.inputTopic=in"], [], "kafka.inputTopic needs kafka.brokers"),
    (["kafka.properties[0]=a=b"], [], "kafka.properties and kafka.propertiesSecret need kafka.brokers"),
    (["kafka.brokers=k:9092", "kafka.inputTopic=in"], [], "needs kafka.inputTopic and kafka.outputTopic"),
    (["kafka.brokers=k:9092", "kafka.inputTopic=t", "kafka.outputTopic=t"], [],
     "kafka.outputTopic must differ from kafka.inputTopic (t)"),
    (["kafka.brokers=k:9092", "kafka.inputTopic=in", "kafka.outputTopic=out", "kafka.errorTopic=e",
      "kafka.stateTopic=e"], [], "kafka.stateTopic (e) must be a topic of its own"),
    (kafka_sets(secret=("creds", "")), [], "kafka.propertiesSecret needs both name and key"),
    (kafka_sets() + ["extraArgs={--kafka-group-id=other}"], [], "extraArgs: --kafka-group-id is set by the chart"),
    (kafka_sets(properties=["a=b"]) + ["extraArgs={--kafka-property=c=d}"], [],
     "extraArgs: --kafka-property is set by the chart"),
    (kafka_sets() + ["env[0].name=SHOAL_KAFKA_MODEL", "env[0].value=x"], [],
     "env: SHOAL_KAFKA_MODEL is set by the chart's kafka values"),
    (kafka_sets() + ["kafka.maxInFlight=0"], [], "kafka.maxInFlight: Must be greater than or equal to 1"),
    (kafka_sets() + ["kafka.inputFormat=json"], [], "kafka.inputFormat: kafka.inputFormat must be one of"),
    (kafka_sets(properties=["sasl.password"]), [], "Does not match pattern"),
])
def test_bad_values_fail_with_a_reason(sets, values, message):
    assert message in render_error(sets, values)


def test_extra_args_that_merely_start_like_a_managed_flag_pass():
    f = flags(shoal_container(pod(render(sets=["extraArgs={--bind-something=1}"]))))
    assert f["--bind-something"] == "1"


def test_kafka_flags_the_chart_does_not_set_may_come_from_extra_args_and_env():
    minimal = {k: KAFKA_VALUES[k] for k in ("brokers", "inputTopic", "outputTopic")}
    c = shoal_container(pod(render(sets=kafka_sets(minimal) + [
        "extraArgs={--kafka-group-id=g}", "env[0].name=SHOAL_KAFKA_MAX_IN_FLIGHT", "env[0].value=sixty"])))
    assert flags(c)["--kafka-group-id"] == "g"
    assert kubelet_env(c)["SHOAL_KAFKA_MAX_IN_FLIGHT"] == "sixty"
