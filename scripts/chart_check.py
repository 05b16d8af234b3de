#!/usr/bin/env python3
"""Checks the Helm chart in helm/ringmoe (and deploy/compose.yaml) with real Helm (v4's Go SDK, through helm-python-sdk).

For every value set in helm/ringmoe/ci/*-values.yaml: `helm lint --strict`, a render for each
Kubernetes version in KUBE_VERSIONS, every rendered manifest validated against that version's
OpenAPI schema (kubernetes-validate, strict: unknown fields are errors), the KEDA ScaledObject
and the ServiceMonitor against their CRDs' schemas (committed in helm/ringmoe/ci/schemas), and
what each value set promises checked in the manifests. Bad values must be refused with the
reason. The values table in helm/ringmoe/README.md must list exactly the keys of values.yaml,
with their defaults.

Run by scripts/test.sh inside the venv it creates (scripts/chart_venv.sh).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from helm_python import _native

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "ringmoe"
CI = CHART / "ci"
DASHBOARD = ROOT / "deploy" / "grafana" / "ringmoe.json"
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
# The API groups a cluster with the Prometheus operator and KEDA serves (beyond the built-ins).
EXTRA_APIS = ["monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor",
              "keda.sh/v1alpha1", "keda.sh/v1alpha1/ScaledObject"]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com-v1-servicemonitor.json",
}

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}", file=sys.stderr)


def render(chart: helm.Chart, values: dict, kube: str, apis: list[str]) -> dict[str, str]:
    """`helm template` offline, for Kubernetes `kube` serving the extra API versions `apis`.
    (Chart.render has no kube_version/api_versions keywords; the native call takes them.)"""
    opts = {"name": "ringmoe", "namespace": "ml", "is_install": True,
            "kube_version": f"v{kube}", "api_versions": apis}
    out = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                d.setdefault("__path", path)
                docs.append(d)
    return docs


def strict_crd(schema: dict) -> dict:
    """A CRD's openAPIV3Schema with unknown fields refused, as the API server prunes and
    `kubectl --validate=strict` reports them."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is validated by the API server itself, not the CRD.
    s.get("properties", {}).pop("metadata", None)
    s.setdefault("properties", {})["metadata"] = {"type": "object"}
    return s


def validate(doc: dict, kube: str, where: str) -> None:
    body = {k: v for k, v in doc.items() if k != "__path"}
    key = (body.get("apiVersion"), body.get("kind"))
    if key in CRD_SCHEMAS:
        schema = strict_crd(json.loads((CI / "schemas" / CRD_SCHEMAS[key]).read_text()))
        errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=str)
        for e in errs:
            fail(f"{where}: {key[1]} {list(e.absolute_path)}: {e.message}")
        return
    try:
        kubernetes_validate.validate(body, kube, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(f"{where}: {body.get('kind')}/{body['metadata'].get('name')} "
             f"{list(e.path)}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        fail(f"{where}: no Kubernetes {kube} schema for {key}: {e}")


def find(docs: list[dict], kind: str, suffix: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def container(docs: list[dict], sts_suffix: str) -> dict:
    (sts,) = find(docs, "StatefulSet", sts_suffix)
    return sts["spec"]["template"]["spec"]["containers"][0]


def expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        fail(f"{where}: {msg}")


def check_promises(name: str, docs: list[dict], values: dict, where: str) -> None:
    """What each value set is for, read off the manifests."""
    kinds = {d["kind"] for d in docs}
    workers = find(docs, "StatefulSet", "-workers")[0]
    wc = container(docs, "-workers")
    cc = container(docs, "-coordinator")
    wargs, cargs = wc["args"], cc["args"]
    expect(wc["command"] == ["ringmoe"] and wargs[0] == "worker", where, "worker runs `ringmoe worker`")
    expect(cargs[0] == "coordinator", where, "coordinator runs `ringmoe coordinator`")
    expect(any(a.startswith("--model-root=") for a in wargs), where, "workers load only from the model volume")
    tls = bool(values.get("security", {}).get("tls", {}).get("secretName"))

    def health_probe(p: dict, service: str = "") -> bool:
        # The kubelet's gRPC probe, or with TLS `ringmoe health` over mTLS.
        if tls:
            cmd = p.get("exec", {}).get("command", [])
            return (cmd[:2] == ["ringmoe", "health"] and "--tls-ca=/etc/ringmoe/tls/ca.crt" in cmd
                    and (not service or f"--service={service}" in cmd))
        return "grpc" in p and p["grpc"].get("service", "") == service

    for probe in ("readinessProbe", "livenessProbe"):
        expect(health_probe(wc.get(probe, {})), where, f"worker {probe} is a gRPC health probe")
    expect(health_probe(cc["readinessProbe"], "ringmoe.v1.JobService"), where,
           "coordinator readiness is JobService's gRPC health (only the leader serves it)")
    if tls:
        for who, args in (("coordinator", cargs), ("workers", wargs)):
            expect({"--tls-cert=/etc/ringmoe/tls/tls.crt", "--tls-key=/etc/ringmoe/tls/tls.key",
                    "--tls-ca=/etc/ringmoe/tls/ca.crt"} <= set(args), where, f"{who} serve and dial with mTLS")
    data_tls = tls and bool(values.get("security", {}).get("tls", {}).get("dataPlane"))
    expect(("--data-tls" in wargs) == data_tls, where,
           "workers run the data plane over TLS exactly when security.tls.dataPlane is set")
    expect(any(a.startswith("--advertise=$(POD_NAME).") for a in wargs), where,
           "workers advertise their pod DNS name")
    headless = find(docs, "Service", "-workers")[0]
    expect(headless["spec"].get("clusterIP") == "None", where, "workers' Service is headless")
    expect({p["name"] for p in headless["spec"]["ports"]} >= {"grpc", "data"}, where,
           "workers' Service declares the gRPC and data ports")
    expect(bool(find(docs, "PodDisruptionBudget", "-workers")), where, "workers have a PDB")
    limits = wc["resources"].get("limits", {})
    if name == "gpu":
        expect(workers["spec"].get("replicas") == 8, where, "8 worker replicas")
        expect(limits.get("nvidia.com/gpu") == 1, where, "one nvidia.com/gpu per worker")
        expect(wc["image"].startswith("ringmoe-cuda:"), where, "GPU workers run the CUDA image")
        expect("--device=cuda:0" in wargs, where, "GPU workers pass --device=cuda:0")
        env = {e["name"]: e.get("value") for e in wc["env"]}
        expect(env.get("NCCL_SOCKET_IFNAME") == "eth0", where, "NCCL_SOCKET_IFNAME is set")
        spec = workers["spec"]["template"]["spec"]
        expect(spec.get("hostNetwork") is True, where, "hostNetwork on")
        tsc = spec.get("topologySpreadConstraints", [])
        expect(bool(tsc) and "labelSelector" in tsc[0], where, "topology spread gets the worker selector")
        expect(spec["volumes"][-1].get("hostPath", {}).get("path") == "/mnt/models"
               or any(v.get("hostPath") for v in spec["volumes"]), where, "models from hostPath")
    else:
        expect("nvidia.com/gpu" not in limits, where, "CPU workers request no GPU")
    if name == "external-etcd-tls":
        (coord,) = find(docs, "StatefulSet", "-coordinator")
        expect(coord["spec"]["replicas"] == 2, where, "2 coordinators")
        etcd_arg = next((a for a in cargs if a.startswith("--etcd=")), "")
        expect(etcd_arg.count("https://") == 3, where, "the external etcd endpoints")
        for flag in ("--etcd-ca=", "--etcd-cert=", "--etcd-key=", "--etcd-user=", "--etcd-domain="):
            expect(any(a.startswith(flag) for a in cargs) and any(a.startswith(flag) for a in wargs),
                   where, f"coordinator and workers pass {flag}")
        expect(not find(docs, "StatefulSet", "-etcd"), where, "no bundled etcd")
        env = {e["name"]: e for e in cc["env"]}
        expect("secretKeyRef" in env.get("RINGMOE_ETCD_PASSWORD", {}).get("valueFrom", {}),
               where, "etcd password from a Secret")
        expect(len(find(docs, "NetworkPolicy")) == 2, where, "NetworkPolicies for coordinator and workers")
        mounts = {m["mountPath"] for m in cc["volumeMounts"]}
        expect({"/etc/ringmoe/tls", "/etc/ringmoe/auth", "/etc/ringmoe/etcd-tls"} <= mounts, where,
               "TLS, auth and etcd TLS Secrets mounted")
        expect("--auth-tokens-file=/etc/ringmoe/clients/tokens" in cargs
               and "/etc/ringmoe/clients" in mounts, where, "the client tokens file")
        expect(not any(a.startswith("--auth-tokens-file") for a in wargs), where,
               "workers take no client tokens")
        expect("--cluster-secret-file=/etc/ringmoe/auth/secret" in cargs
               and "--cluster-secret-file=/etc/ringmoe/auth/secret" in wargs, where,
               "coordinator and workers hold the cluster secret")
        (test_pod,) = [d for d in docs if d["kind"] == "Pod"]
        expect("--token-file=/etc/ringmoe/test-token/token" in test_pod["spec"]["containers"][0]["args"],
               where, "the helm test pod authenticates")
    if name == "default":
        (etcd,) = find(docs, "StatefulSet", "-etcd")
        expect(etcd["spec"]["replicas"] == 3, where, "a 3-member bundled etcd")
        expect(workers["spec"].get("replicas") == 2, where, "2 workers")
        expect(not kinds & {"HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor", "NetworkPolicy"},
               where, "no autoscaler, ServiceMonitor or NetworkPolicy by default")
    if values.get("autoscaling", {}).get("enabled"):
        expect("replicas" not in workers["spec"], where, "the autoscaler owns the worker replicas")
        want = "HorizontalPodAutoscaler" if values["autoscaling"]["kind"] == "hpa" else "ScaledObject"
        expect(want in kinds, where, f"a {want}")
    if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        expect("ServiceMonitor" in kinds, where, "a ServiceMonitor where the CRD is served")
    if values.get("etcd", {}).get("mode") == "none":
        expect(any(a.startswith("--coordinator=") for a in wargs), where, "workers heartbeat to the coordinator")
        expect(not any(a.startswith("--etcd") for a in wargs + cargs), where, "no --etcd without etcd")
    metrics = values.get("metrics", {})
    if metrics.get("enabled", True):
        port = metrics.get("port", 9464)
        for who, c, args in (("worker", wc, wargs), ("coordinator", cc, cargs)):
            expect(f"--metrics-addr=0.0.0.0:{port}" in args, where, f"{who} serves /metrics on {port}")
            expect(any(p.get("name") == "metrics" and p["containerPort"] == port for p in c["ports"]),
                   where, f"{who} declares its metrics port")
    expect(f"--log-format={values.get('logFormat', 'text')}" in wargs + cargs, where, "the log format is passed")
    otlp = values.get("tracing", {}).get("otlpEndpoint")
    for who, c in (("worker", wc), ("coordinator", cc)):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if otlp:
            expect(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == otlp, where, f"{who} exports traces to {otlp}")
            expect(env.get("OTEL_SERVICE_NAME") == f"ringmoe-{who}", where, f"{who}'s OTEL_SERVICE_NAME")
        else:
            expect("OTEL_EXPORTER_OTLP_ENDPOINT" not in env, where, f"{who}: no trace export unless asked")
    dash = [d for d in find(docs, "ConfigMap", "-dashboard")]
    if metrics.get("dashboard", {}).get("enabled"):
        expect(len(dash) == 1, where, "a dashboard ConfigMap")
        if dash:
            expect(dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1", where,
                   "the dashboard ConfigMap has the Grafana sidecar's label")
            expect(json.loads(dash[0]["data"]["ringmoe.json"]) == json.loads(DASHBOARD.read_text()), where,
                   "the ConfigMap holds deploy/grafana/ringmoe.json")
    else:
        expect(not dash, where, "no dashboard ConfigMap unless asked")
    tests = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    expect(any(d["kind"] == "Pod" for d in tests), where, "a `helm test` pod")


BAD_VALUES = [
    ({"coordinator": {"replicas": 2}}, "ReadWriteMany"),
    ({"coordinator": {"replicas": 2, "store": {"accessModes": ["ReadWriteMany"]}},
      "etcd": {"mode": "none"}}, "/etcd/mode"),
    ({"workers": {"device": "tpu"}}, "/workers/device"),
    ({"workers": {"replicas": 0}}, "/workers/replicas"),
    ({"workers": {"dataPorts": {"first": 7070, "count": 4}, "port": 7071}}, "include workers.port"),
    ({"autoscaling": {"enabled": True, "minReplicas": 9, "maxReplicas": 2}}, "minReplicas"),
    ({"etcd": {"mode": "external"}}, "endpoints"),
    ({"etcd": {"bundled": {"replicas": 2}}}, "replicas"),
    ({"etcd": {"bundled": {"tls": {"enabled": True}}}}, "secretName"),
    ({"model": {"volume": {"existingClaim": "a", "hostPath": "/b"}}}, "volume"),
    ({"workers": {"kvBudgetGib": 8}}, "kvBudgetGib"),
    ({"security": {"clients": {"tokensConfigMap": "c"}}}, "tests.tokenSecret"),
    ({"security": {"tls": {"dataPlane": True}}}, "security.tls.secretName"),
]


def check_bad_values(chart: helm.Chart) -> None:
    for values, reason in BAD_VALUES:
        where = f"bad values {json.dumps(values)}"
        try:
            render(chart, values, KUBE_VERSIONS[-1], [])
        except helm.HelmError as e:
            if reason.lower() not in str(e).lower():
                fail(f"{where}: refused, but the message does not name {reason!r}: {e}")
            else:
                detail = " ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip())
                print(f"ok   {where}: refused: {(detail or str(e))[:160]}")
            continue
        fail(f"{where}: rendered; the chart should refuse it")


def values_table(text: str) -> str:
    """The values table README.md carries, from values.yaml: one row per key whose `# --`
    comment documents it (the key below the comment; a map documented as a whole is one row)."""
    values = yaml.safe_load(text)
    lines = text.splitlines()
    rows, stack, documented = [], [], set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        key = ".".join(stack)
        j, doc = i - 1, []
        while j >= 0 and lines[j].strip().startswith("#"):
            c = lines[j].strip()
            if c.startswith("# --"):
                doc.insert(0, c.removeprefix("# --").strip())
                break
            doc.insert(0, c.removeprefix("#").strip())
            j -= 1
        else:
            doc = []
        if not doc:
            continue
        documented.add(key)
        value = values
        for part in stack:
            value = value[part]
        kind = {dict: "object", list: "list", bool: "bool", int: "int", float: "number",
                str: "string"}.get(type(value), type(value).__name__)
        desc = " ".join(doc).replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | `{json.dumps(value, ensure_ascii=False)}` | {desc} |")
    # Every leaf must be covered by a documented key or a documented parent.
    def leaves(node, prefix=""):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v and key not in documented:
                yield from leaves(v, key + ".")
            else:
                yield key
    missing = [k for k in leaves(values) if k not in documented]
    if missing:
        fail(f"values.yaml: keys without a `# --` comment: {missing}")
    return "\n".join(["| Key | Type | Default | Description |", "|---|---|---|---|", *rows])


BEGIN, END = "<!-- values table: begin (scripts/chart_check.py --write-readme) -->", "<!-- values table: end -->"


def check_readme(write: bool) -> None:
    table = values_table((CHART / "values.yaml").read_text())
    path = CHART / "README.md"
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
        fail(f"{path}: no values table markers")
        return
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    want = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    if want == readme:
        print("ok   helm/ringmoe/README.md: the values table matches values.yaml")
    elif write:
        path.write_text(want)
        print(f"wrote the values table into {path}")
    else:
        fail(f"{path}: the values table differs from values.yaml (run scripts/chart_check.py --write-readme)")


def check_compose() -> None:
    """deploy/compose.yaml against the Compose Specification's schema (deploy/ci/, from the
    compose-spec repository at commit 170098ba07d9), plus what it is for."""
    schema = json.loads((ROOT / "deploy" / "ci" / "compose-spec.json").read_text())
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str):
        fail(f"deploy/compose.yaml {list(e.absolute_path)}: {e.message}")
    services = compose.get("services", {})
    expect({"etcd", "coordinator", "worker-0", "worker-1"} <= set(services), "deploy/compose.yaml",
           "etcd, a coordinator and 2 workers")
    print("ok   deploy/compose.yaml: valid against the Compose Specification")


def check_dashboard() -> None:
    """The chart's copy is deploy/grafana/ringmoe.json, and every ringmoe metric it queries is
    one the code records."""
    chart_copy = CHART / "dashboards" / "ringmoe.json"
    if chart_copy.read_text() != DASHBOARD.read_text():
        fail(f"{chart_copy} differs from {DASHBOARD} (copy it: helm packages files inside the chart only)")
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\b(ringmoe_[a-z_]+?)(?:_bucket)?\b", exprs))
    source = " ".join(p.read_text() for p in (ROOT / "crates").glob("*/src/**/*.rs"))
    for m in sorted(used):
        if f'"{m}"' not in source:
            fail(f"the dashboard queries {m}, which no crate records")
    print(f"ok   dashboard: {len(dash['panels'])} panels over {len(used)} ringmoe metrics")


def main() -> int:
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else '?'}")
    chart = helm.Chart.load(CHART)
    sets = sorted(CI.glob("*-values.yaml"))
    if len(sets) < 4:
        fail(f"want at least 4 value sets in {CI}, found {len(sets)}")
    for path in sets:
        name = path.name.removesuffix("-values.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        for kube in KUBE_VERSIONS:
            report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube}")
            for m in report.get("messages", []):
                fail(f"lint {name} (Kubernetes {kube}): {m}")
            for e in report.get("errors", []):
                fail(f"lint {name} (Kubernetes {kube}): {e}")
            where = f"{name} on Kubernetes {kube}"
            try:
                docs = manifests(render(chart, values, kube, EXTRA_APIS))
            except helm.HelmError as e:
                fail(f"{where}: render failed: {e}")
                continue
            for d in docs:
                validate(d, kube, where)
            check_promises(name, docs, values, where)
            # Where the Prometheus operator is not installed, no ServiceMonitor is rendered.
            bare = manifests(render(chart, values, kube, []))
            expect(not find(bare, "ServiceMonitor"), where, "no ServiceMonitor without its CRD")
            print(f"ok   {where}: {len(docs)} manifests valid")
    check_bad_values(chart)
    check_dashboard()
    check_compose()
    check_readme("--write-readme" in sys.argv)
    if failures:
        print(f"chart check: {len(failures)} failure(s)", file=sys.stderr)
        return 1
    print("chart check: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
