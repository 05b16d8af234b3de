#!/usr/bin/env python3
"""The chart's commands really run: renders helm/ringmoe, takes the exact command, args and env
of the bundled etcd members, the coordinator, the workers and the `helm test` pod from the
manifests, and starts them as processes on 127.0.0.1, then the test pod's `ringmoe submit` must
complete a job. A flag the chart names and the binary lacks, a wrong address or a missing
argument fails here.

What stands in for Kubernetes, and nothing else:
  * `$(VAR)` in args is expanded from the container's env as the kubelet does, with the
    downward-API fields metadata.name / metadata.namespace / status.podIP set to the pod's name,
    the namespace and 127.0.0.1;
  * every pod runs on 127.0.0.1, so each (pod, container port) gets a free port of its own: an
    address naming a pod (`<pod>.<headless service>.<ns>.svc.<domain>:PORT`), a Service
    (`<service>.<ns>.svc.<domain>:PORT`, its first pod) or the pod itself (`0.0.0.0:PORT`) is
    rewritten to 127.0.0.1 and that pod's port;
  * volume paths: the model mount is tests/fixtures, the job store and etcd data are temporary
    directories, the test prompt ConfigMap is a file, the cluster-secret and TLS Secrets are
    files this script makes (a random secret; a CA and a certificate for 127.0.0.1 by openssl).

The values turn the security features on (cluster secret, mTLS on every gRPC hop, the model
root), so the probes are the chart's `ringmoe health` over mTLS, run in place of the kubelet.

Usage: chart_cluster_test.py PATH/TO/ringmoe
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helm_python as helm
import yaml
from helm_python import _native

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "ringmoe"
NAMESPACE = "ml"
DOMAIN = "cluster.local"
BOOT_TIMEOUT = 60.0
JOB_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_block(n: int) -> int:
    """The first of n consecutive free ports."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class Ports:
    """A free 127.0.0.1 port for each (pod, container port)."""

    def __init__(self) -> None:
        self.map: dict[tuple[str, int], int] = {}

    def get(self, pod: str, port: int) -> int:
        if (pod, port) not in self.map:
            taken = set(self.map.values())
            p = free_port()
            while p in taken:
                p = free_port()
            self.map[(pod, port)] = p
        return self.map[(pod, port)]


class Pod:
    def __init__(self, name: str, container: dict, kind: str):
        self.name, self.container, self.kind = name, container, kind


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    opts = {"name": "ringmoe", "namespace": NAMESPACE, "is_install": True}
    out = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def pods_of(docs: list[dict]) -> tuple[list[Pod], dict[str, list[str]], dict[str, str]]:
    """The pods the manifests make (StatefulSet replicas by ordinal, and bare Pods), which pods
    each Service selects, and the ConfigMaps' files."""
    pods, selected, files = [], {}, {}
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "StatefulSet":
            tmpl = d["spec"]["template"]
            for i in range(d["spec"].get("replicas", 1)):
                pods.append(Pod(f"{name}-{i}", tmpl["spec"]["containers"][0], name))
                pods[-1].labels = tmpl["metadata"]["labels"]
        elif kind == "Pod":
            pods.append(Pod(name, d["spec"]["containers"][0], "Pod"))
            pods[-1].labels = d["metadata"].get("labels", {})
        elif kind == "ConfigMap":
            files.update(d.get("data", {}))
    for d in docs:
        if d["kind"] == "Service" and d["spec"].get("selector"):
            sel = d["spec"]["selector"]
            selected[d["metadata"]["name"]] = [
                p.name for p in pods if all(p.labels.get(k) == v for k, v in sel.items())
            ]
    return pods, selected, files


def localize(pod: Pod, pods: list[Pod], services: dict[str, list[str]], ports: Ports,
             paths: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The pod's command line and environment as they run on 127.0.0.1."""
    c = pod.container
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE,
                              "status.podIP": "127.0.0.1"}[field]
    argv = list(c["command"]) + list(c.get("args", []))
    # The kubelet's $(VAR) expansion.
    argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in argv]
    pod_names = {p.name for p in pods}
    suffix = f".{NAMESPACE}.svc.{DOMAIN}"

    def addr(m: re.Match) -> str:
        host, port = m.group("host"), int(m.group("port"))
        if host == "0.0.0.0":
            target = pod.name
        elif host.endswith(suffix):
            first = host.removesuffix(suffix).split(".")[0]
            if first in pod_names:
                target = first
            elif first in services and services[first]:
                target = services[first][0]
            else:
                raise SystemExit(f"{pod.name}: {host} names no pod or Service of the chart")
        else:
            return m.group(0)
        return f"127.0.0.1:{ports.get(target, port)}"

    out = []
    for a in argv:
        a = re.sub(r"(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{2,5})\b", addr, a)
        for src, dst in paths.items():
            a = a.replace(src, dst.format(pod=pod.name))
        out.append(a)
    return out, env


def make_certs(d: Path) -> None:
    """A CA and one certificate it signed, as a cert-manager Secret holds them (tls.crt,
    tls.key, ca.crt), for server and client use on 127.0.0.1, where every pod runs here."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    openssl("req", "-x509", "-days", "2", "-subj", "/CN=ringmoe-chart-test-ca", *ec,
            "-keyout", "ca.key", "-out", "ca.crt")
    (d / "ext.cnf").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n"
                               "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-new", "-subj", "/CN=ringmoe", *ec, "-keyout", "tls.key", "-out", "tls.csr")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "tls.crt")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    binary = Path(sys.argv[1]).resolve()
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{binary}: not an executable ringmoe binary")
    if shutil.which("etcd") is None:
        raise SystemExit("etcd not found: install Debian's etcd-server (scripts/test.sh does)")
    tmp = Path(tempfile.mkdtemp(prefix="ringmoe-chart-"))
    data_first = free_block(8)
    values = {
        "model": {"name": "mixtral-tiny", "path": "mixtral-tiny", "mountPath": "/models"},
        "workers": {"replicas": 2, "dataPorts": {"first": data_first, "count": 8}, "kvBudgetGiB": 1},
        "coordinator": {"minWorkers": 2},
        "tests": {"maxNewTokens": 8},
        # The security wiring too: coordinator and workers must hold the same cluster secret,
        # and every gRPC hop (probes and the test pod included) is mTLS with one CA.
        "security": {"auth": {"clusterSecretName": "ringmoe-cluster-secret"},
                     "tls": {"secretName": "ringmoe-tls"}},
    }
    docs = render(values)
    pods, services, files = pods_of(docs)
    tls = tmp / "tls"
    make_certs(tls)
    auth = tmp / "auth"
    auth.mkdir()
    (auth / "secret").write_text(os.urandom(24).hex() + "\n")
    prompt = tmp / "prompt"
    prompt.mkdir()
    for name, text in files.items():
        (prompt / name).write_text(text)
    paths = {
        "/models/": f"{ROOT}/tests/fixtures/",
        "/var/lib/ringmoe": str(tmp / "store"),
        # Each etcd member has a data volume of its own.
        "/var/lib/etcd": str(tmp / "{pod}"),
        "/etc/ringmoe/test": str(prompt),
        "/etc/ringmoe/auth": str(auth),
        "/etc/ringmoe/tls": str(tls),
    }
    ports = Ports()
    procs: list[tuple[str, subprocess.Popen]] = []
    order = {"etcd": 0, "coordinator": 1, "worker": 2}

    def component(p: Pod) -> str:
        return p.labels.get("app.kubernetes.io/component", "")

    servers = sorted((p for p in pods if component(p) in order), key=lambda p: order[component(p)])
    tests = [p for p in pods if component(p) == "test"]
    if [component(p) for p in servers].count("worker") != 2 or len(tests) != 1:
        raise SystemExit(f"expected 2 workers and a test pod, got {[p.name for p in pods]}")
    try:
        # All at once, in no particular order, as Kubernetes starts pods.
        for p in servers:
            argv, env = localize(p, pods, services, ports, paths)
            exe = {"ringmoe": str(binary), "/usr/local/bin/etcd": shutil.which("etcd")}.get(argv[0])
            if exe is None:
                raise SystemExit(f"{p.name}: unexpected command {argv[0]}")
            argv[0] = exe
            log = tmp / f"{p.name}.log"
            print(f"start {p.name}: {' '.join(argv)}")
            proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log.open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.append((p.name, proc))
        # Readiness probes through the image's own health command.
        (coord,) = [p for p in servers if component(p) == "coordinator"]
        # `helm install --wait` then `helm test`: every server pod's readiness probe passes
        # (the workers' too) before the test pod runs.
        probes = []
        for p in [coord] + [p for p in servers if component(p) == "worker"]:
            pr = p.container["readinessProbe"]
            if "grpc" in pr:
                probes.append((p.name, [str(binary), "health",
                                        f"--addr=127.0.0.1:{ports.get(p.name, pr['grpc']['port'])}",
                                        f"--service={pr['grpc'].get('service', '')}"]))
                continue
            # With TLS the probe is `ringmoe health` over mTLS, run in the pod.
            cmd = [str(binary)]
            for a in pr["exec"]["command"][1:]:
                m = re.fullmatch(r"--addr=127\.0\.0\.1:(\d+)", a)
                if m:
                    a = f"--addr=127.0.0.1:{ports.get(p.name, int(m.group(1)))}"
                for src, dst in paths.items():
                    a = a.replace(src, dst.format(pod=p.name))
                cmd.append(a)
            probes.append((p.name, cmd))
        for pod_name, health in probes:
            t = time.monotonic()
            while subprocess.run(health, capture_output=True).returncode != 0:
                for name, proc in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited with {proc.returncode}:\n"
                                         f"{(tmp / (name + '.log')).read_text()[-4000:]}")
                if time.monotonic() - t > BOOT_TIMEOUT:
                    raise SystemExit(f"{pod_name} was not ready in {BOOT_TIMEOUT}s")
                time.sleep(0.3)
            print(f"ready {pod_name} after {time.monotonic() - t:.1f}s ({' '.join(health[1:])})")
        (test,) = tests
        argv, env = localize(test, pods, services, ports, paths)
        argv[0] = str(binary)
        print(f"run   {test.name}: {' '.join(argv)}")
        r = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=JOB_TIMEOUT)
        for name, proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} during the job:\n"
                                 f"{(tmp / (name + '.log')).read_text()[-4000:]}")
        if r.returncode != 0:
            logs = "".join(f"\n--- {name} (last lines) ---\n"
                           + "\n".join((tmp / (name + '.log')).read_text().splitlines()[-25:])
                           for name, _ in procs)
            raise SystemExit(f"the test pod's submit failed ({r.returncode}):\n{r.stdout}\n{r.stderr}{logs}")
        out = json.loads(r.stdout)
        tokens = out.get("result", {}).get("tokens") if isinstance(out.get("result"), dict) else out.get("tokens")
        print(f"submit: {r.stdout.strip()[:300]}")
        if out.get("state") != "done" or not tokens or len(tokens) != 8:
            raise SystemExit(f"the job did not finish with 8 tokens: {out}")
        print(f"chart cluster test: the job completed on the rendered commands ({len(tokens)} tokens)")
        return 0
    finally:
        for _, proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if os.environ.get("RINGMOE_KEEP_TMP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
