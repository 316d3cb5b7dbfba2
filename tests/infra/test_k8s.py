"""The Kubernetes manifests of infra/k8s, validated offline.

Each variant (a kustomize overlay: ``gateway-api``, ``smg``) is rendered here without a
kustomize binary: the overlays only list resources (no patches, no generators), which the
renderer below refuses to see otherwise. Core kinds are checked against Kubernetes' own schemas
(``kubernetes-validate``, strict: unknown fields fail); the CRD kinds (InferencePool, Gateway,
HTTPRoute) against the required fields of their v1 schemas; and the objects against each other:
selectors match pod labels, ports match container ports, routes name pools and listeners that
exist, and ``specthink serve`` is pointed at the routers of its own variant.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests")
kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason="kubernetes-validate ships the schemas")
jsonschema = pytest.importorskip("jsonschema", reason="kubernetes-validate checks with it")

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
VARIANTS = ("gateway-api", "smg")
NAMESPACE = "specthink"
KUBERNETES_VERSION = "1.33.0"
CRD_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
SERVE_PORT = 8000
ROLES = ("small", "target")

Doc = dict[str, Any]


# --------------------------------------------------------------------------- rendering


def render(directory: Path) -> list[Doc]:
    """The resources of a kustomization, recursively, in order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not unsupported, (
        f"{directory}: {sorted(unsupported)} need a real kustomize; keep overlays to "
        "resource lists (or teach this renderer)")
    docs: list[Doc] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    name: str = request.param
    return name, render(K8S / "overlays" / name)


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def pod_labels(workload: Doc) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def workloads_selected(docs: list[Doc], selector: dict[str, str]) -> list[Doc]:
    return [d for d in of_kind(docs, "Deployment") if selects(selector, pod_labels(d))]


def container_ports(workload: Doc) -> dict[str | int, int]:
    """Container ports by name and by number."""
    ports: dict[str | int, int] = {}
    for container in containers(workload):
        for port in container.get("ports", ()):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def args_of(container: Doc) -> list[str]:
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def flag(arguments: list[str], name: str) -> list[str]:
    """The values after ``name`` (``--x=v`` or ``--x v1 v2 ...`` up to the next flag)."""
    for index, argument in enumerate(arguments):
        if argument.startswith(name + "="):
            return [argument.split("=", 1)[1]]
        if argument == name:
            values = []
            for value in arguments[index + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            return values
    raise AssertionError(f"{name} not among {shlex.join(arguments)}")


# --------------------------------------------------------------------------- schemas


def test_every_variant_renders_and_keeps_one_namespace(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    keys = Counter((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                   for d in docs)
    assert not [k for k, n in keys.items() if n > 1], f"{name}: duplicate objects"
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, (
            f"{name}: {doc['kind']} {doc['metadata']['name']} is not in {NAMESPACE}")
    assert named(docs, "Namespace", NAMESPACE)


def test_core_kinds_validate_against_kubernetes_schemas(variant: tuple[str, list[Doc]]) -> None:
    """Strict: an unknown or misspelt field fails, as ``kubectl apply --validate=strict``
    would."""
    name, docs = variant
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            error = getattr(exc, "caught", exc)
            where = "/".join(str(p) for p in getattr(error, "absolute_path", ()))
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: "
                        f"{str(error).splitlines()[0]} at {where}")
        checked += 1
    assert checked >= 10


def test_crd_kinds_have_their_required_fields(variant: tuple[str, list[Doc]]) -> None:
    """The required fields and bounds of the v1 InferencePool, Gateway and HTTPRoute schemas
    (the CRDs are not shipped with kubernetes-validate)."""
    name, docs = variant
    for pool in of_kind(docs, "InferencePool"):
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        spec = pool["spec"]
        assert set(spec) <= {"selector", "targetPorts", "endpointPickerRef", "appProtocol"}
        labels = spec["selector"]["matchLabels"]
        assert isinstance(labels, dict) and labels
        numbers = [port["number"] for port in spec["targetPorts"]]
        assert 1 <= len(numbers) <= 8 and len(set(numbers)) == len(numbers)
        assert all(isinstance(n, int) and 1 <= n <= 65535 for n in numbers)
        picker = spec["endpointPickerRef"]
        assert picker["name"]
        if picker.get("kind", "Service") == "Service":
            assert 1 <= picker["port"]["number"] <= 65535, "port is required for a Service"
        assert picker.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
    for gateway in of_kind(docs, "Gateway"):
        assert gateway["spec"]["gatewayClassName"]
        listeners = gateway["spec"]["listeners"]
        assert 1 <= len(listeners) <= 64
        assert len({listener["name"] for listener in listeners}) == len(listeners)
        for listener in listeners:
            assert listener["protocol"] in ("HTTP", "HTTPS")
            assert 1 <= listener["port"] <= 65535
    for route in of_kind(docs, "HTTPRoute"):
        assert route["spec"]["parentRefs"], "a route attaches to a Gateway"
        for rule in route["spec"]["rules"]:
            for backend in rule["backendRefs"]:
                assert backend["name"]
    if name == "gateway-api":
        assert len(of_kind(docs, "InferencePool")) == 2
        assert len(of_kind(docs, "HTTPRoute")) == 2


# --------------------------------------------------------------------------- cross-references


def test_workload_selectors_match_their_pods(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    for workload in of_kind(docs, "Deployment"):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selects(selector, pod_labels(workload)), (
            f"{name}: Deployment {workload['metadata']['name']} does not select its own pods")
        account = workload["spec"]["template"]["spec"].get("serviceAccountName")
        if account:
            named(docs, "ServiceAccount", account)


def test_services_reach_container_ports(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    for service in of_kind(docs, "Service"):
        targets = workloads_selected(docs, service["spec"]["selector"])
        assert len(targets) == 1, (
            f"{name}: Service {service['metadata']['name']} selects {len(targets)} Deployments")
        ports = container_ports(targets[0])
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, (
                f"{name}: Service {service['metadata']['name']} port {port['name']} targets "
                f"{target!r}, not a container port of {targets[0]['metadata']['name']}")


def test_every_role_runs_vllm_with_prefix_caching(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    for role in ROLES:
        (vllm,) = workloads_selected(docs, {"app.kubernetes.io/name": "vllm",
                                            "specthink.dev/role": role})
        arguments = args_of(containers(vllm)[0])
        assert "--enable-prefix-caching" in arguments
        assert flag(arguments, "--port") == ["8000"]
        assert vllm["spec"]["replicas"] >= 2, "a pool of one is not scale-out"
        gpu = containers(vllm)[0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpu) >= 1


def test_serve_is_replicated_probed_budgeted_and_autoscaled(
        variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    serve = named(docs, "Deployment", "specthink-serve")
    assert serve["spec"]["replicas"] >= 2
    (container,) = containers(serve)
    arguments = args_of(container)
    assert arguments[:2] == ["specthink", "serve"]
    assert flag(arguments, "--backend") == ["openai"]
    assert flag(arguments, "--host") == ["0.0.0.0"]
    assert flag(arguments, "--port") == [str(SERVE_PORT)]
    drain = float(flag(arguments, "--drain-timeout")[0])
    assert serve["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    ports = container_ports(serve)
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/health"
        assert ports[check["port"]] == SERVE_PORT
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    budget = named(docs, "PodDisruptionBudget", "specthink-serve")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(serve))
    assert budget["spec"]["minAvailable"] < serve["spec"]["replicas"]
    scaler = named(docs, "HorizontalPodAutoscaler", "specthink-serve")
    target = scaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "specthink-serve")
    assert scaler["spec"]["minReplicas"] >= 2
    service = named(docs, "Service", "specthink-serve")
    assert selects(service["spec"]["selector"], pod_labels(serve))


def _serve_urls(docs: list[Doc]) -> dict[str, str]:
    serve = named(docs, "Deployment", "specthink-serve")
    (container,) = containers(serve)
    arguments = args_of(container)
    env = {e["name"]: e for e in container["env"]}
    urls = {}
    for role in ROLES:
        (value,) = flag(arguments, f"--{role}")
        variable = re.fullmatch(r"\$\((\w+)\)", value)
        assert variable, f"--{role} should come from the variant's ConfigMap, got {value!r}"
        ref = env[variable.group(1)]["valueFrom"]["configMapKeyRef"]
        config = named(docs, "ConfigMap", ref["name"])
        urls[role] = config["data"][ref["key"]]
    return urls


def _service_host(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname
    host = parts.hostname
    suffix = f".{NAMESPACE}.svc.cluster.local"
    assert host.endswith(suffix), f"{url}: not a Service of namespace {NAMESPACE}"
    return host.removesuffix(suffix), parts.port or 80


def test_gateway_routes_name_the_pools_and_serve_uses_the_listeners() -> None:
    docs = render(K8S / "overlays" / "gateway-api")
    (gateway,) = of_kind(docs, "Gateway")
    listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
    urls = _serve_urls(docs)
    for role in ROLES:
        pool = named(docs, "InferencePool", f"vllm-{role}")
        (vllm,) = workloads_selected(docs, pool["spec"]["selector"]["matchLabels"])
        assert pod_labels(vllm)["specthink.dev/role"] == role
        ports = container_ports(vllm)
        assert all(p["number"] in ports for p in pool["spec"]["targetPorts"])
        # The endpoint picker: its Service and port, its Deployment watching this pool, and
        # a scheduling profile scoring the prefix cache plus a load signal.
        picker = pool["spec"]["endpointPickerRef"]
        service = named(docs, "Service", picker["name"])
        assert picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
        (epp,) = workloads_selected(docs, service["spec"]["selector"])
        epp_args = args_of(containers(epp)[0])
        assert flag(epp_args, "--pool-name") == [pool["metadata"]["name"]]
        assert flag(epp_args, "--pool-namespace") == [NAMESPACE]
        (config_file,) = flag(epp_args, "--config-file")
        mount = containers(epp)[0]["volumeMounts"][0]
        assert config_file.startswith(mount["mountPath"] + "/")
        volume = next(v for v in epp["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mount["name"])
        config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
        config = yaml.safe_load(config_map["data"][config_file.rsplit("/", 1)[1]])
        assert config["kind"] == "EndpointPickerConfig"
        plugins = {p["type"] for p in config["plugins"]}
        (profile,) = config["schedulingProfiles"]
        used = {ref["pluginRef"] for ref in profile["plugins"]}
        assert used <= plugins
        assert "prefix-cache-scorer" in used
        assert used & {"queue-scorer", "kv-cache-utilization-scorer"}, "no load scorer"
        _assert_can_watch(docs, epp, "pods")
        _assert_can_watch(docs, epp, "inferencepools")
        # The route: attached to this role's listener, sending to this role's pool.
        route = named(docs, "HTTPRoute", f"vllm-{role}")
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gateway["metadata"]["name"]
        listener = listeners[parent["sectionName"]]
        (rule,) = route["spec"]["rules"]
        (backend,) = rule["backendRefs"]
        assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io",
                                                       "InferencePool")
        assert backend["name"] == pool["metadata"]["name"]
        # serve: this role's URL is the Gateway (Istio's Service for it) on that listener.
        host, port = _service_host(urls[role])
        assert host == f"{gateway['metadata']['name']}-{gateway['spec']['gatewayClassName']}"
        assert port == listener["port"]


def _assert_can_watch(docs: list[Doc], workload: Doc, resource: str) -> None:
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in of_kind(docs, "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account
                   for s in binding["subjects"]):
            continue
        role = named(docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            if resource in rule["resources"] and {"get", "list", "watch"} <= set(rule["verbs"]):
                return
    pytest.fail(f"{workload['metadata']['name']} ({account}) may not watch {resource}")


def test_smg_routers_discover_their_pool_and_keep_sessions() -> None:
    docs = render(K8S / "overlays" / "smg")
    urls = _serve_urls(docs)
    for role in ROLES:
        router = named(docs, "Deployment", f"smg-{role}")
        arguments = args_of(containers(router)[0])
        assert "--service-discovery" in arguments
        selector = dict(item.split("=", 1) for item in flag(arguments, "--selector"))
        (vllm,) = workloads_selected(docs, selector)
        assert pod_labels(vllm)["specthink.dev/role"] == role
        assert int(flag(arguments, "--service-discovery-port")[0]) in container_ports(vllm)
        assert flag(arguments, "--service-discovery-namespace") == [NAMESPACE]
        assert flag(arguments, "--policy") == ["cache_aware"]
        assert "--sticky-sessions" in arguments
        assert [h.lower() for h in flag(arguments, "--routing-key-headers")] == ["x-session-id"]
        assert flag(arguments, "--assignment-mode") == ["min_load"]
        _assert_can_watch(docs, router, "pods")
        # serve: this role's URL is this router's Service, on a port that reaches smg.
        host, port = _service_host(urls[role])
        service = named(docs, "Service", host)
        (target,) = workloads_selected(docs, service["spec"]["selector"])
        assert target is router
        served = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
        listen = int(flag(arguments, "--port")[0])
        assert container_ports(router)[served[port]] == listen


def test_the_renderer_reads_every_manifest_file() -> None:
    """A manifest no kustomization lists is never applied (nor validated)."""
    listed: set[Path] = set()

    def walk(directory: Path) -> Iterator[Path]:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kustomization["resources"]:
            path = (directory / entry).resolve()
            if path.is_dir():
                yield from walk(path)
            else:
                yield path

    for name in VARIANTS:
        listed |= set(walk(K8S / "overlays" / name))
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed, f"not in any variant: {sorted(map(str, files - listed))}"
