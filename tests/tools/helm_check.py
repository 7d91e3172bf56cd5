"""Renders, lints and schema-checks the Helm chart (`cargo xtask dist`).

Helm itself does the work: helm-python-sdk binds Helm's Go SDK (v4). The rendered objects
are validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields are errors). With the default values the chart must render the same pod, daemon
configuration and NetworkPolicy rules as deploy/kubernetes/daemonset.yaml. Each rendered
daemon configuration is written to --configs-dir, for the real `pyebpf config check`.
The chart is packaged into --package-dir. Exits non-zero on the first difference.
"""
import argparse
import copy
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"

# Values sets rendered besides the defaults: each must pass the schema and render valid objects.
CASES = {
    "defaults": {},
    "exports": {
        "image": {"repository": "registry.example/pyebpf", "tag": "9.9.9"},
        "samplingRateHz": 49,
        "include": [{"cmdline": r"\b(gunicorn|uvicorn)\b"}, {"command": "celery", "exe": "/usr/bin/python3.12"}],
        "exclude": [{"container_id": "0123456789ab"}],
        "pyroscope": {"url": "http://pyroscope.pyroscope.svc:4040", "applicationName": "shop"},
        "otlp": {"endpoint": "https://collector.otel:4317", "protocol": "grpc",
                 "headers": {"authorization": "Bearer x"}},
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
        "networkPolicy": {"enabled": False},
        "extraConfig": {"aggregation": {"window_secs": 30}},
    },
}
# Values the schema must refuse.
REFUSED = {
    "rate 0": {"samplingRateHz": 0},
    "rate 10001": {"samplingRateHz": 10001},
    "unknown key": {"samplingRate": 99},
    "empty rule": {"include": [{}]},
    "unknown rule field": {"include": [{"cmd": "x"}]},
    "otlp protocol": {"otlp": {"endpoint": "http://c:4317", "protocol": "udp"}},
    "pyroscope url": {"pyroscope": {"url": "pyroscope:4040"}},
    "networkPolicy.enabled": {"networkPolicy": {"enabled": "yes"}},
}


def fail(msg):
    print(f"helm_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def docs(manifests):
    out = {}
    for name, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def strip_empty(d):
    if isinstance(d, dict):
        return {k: strip_empty(v) for k, v in d.items() if v not in (None, [], {})}
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chart", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--package-dir", required=True)
    ap.add_argument("--configs-dir", required=True)
    a = ap.parse_args()

    report = helm.lint(a.chart, strict=True, kube_version="v" + K8S_VERSION)
    bad = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2] + (report.get("errors") or [])
    if bad:
        fail(f"helm lint: {bad}")

    with helm.Chart.load(a.chart) as chart:
        if chart.version != a.version or chart.metadata.get("appVersion") != a.version:
            fail(f"chart version {chart.version} / appVersion {chart.metadata.get('appVersion')} != {a.version}")
        for label, values in REFUSED.items():
            try:
                chart.validate_schema(values)
            except Exception:
                continue
            fail(f"values.schema.json accepts bad values ({label}): {values}")

        rendered = {}
        for case, values in CASES.items():
            chart.validate_schema(values)
            objs = docs(chart.render(values, name="pyebpf", namespace="pyebpf", is_install=True))
            for (kind, name), obj in objs.items():
                try:
                    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{case}: {kind}/{name}: {e.message} at {list(e.path)}")
            config = objs[("ConfigMap", "pyebpf")]["data"]["pyebpf.yaml"]
            with open(os.path.join(a.configs_dir, f"{case}.yaml"), "w") as f:
                f.write(config)
            rendered[case] = objs
            print(f"helm_check: {case}: {', '.join(f'{k}/{n}' for k, n in objs)}: rendered, valid")

        ex = rendered["exports"]
        ds = ex[("DaemonSet", "pyebpf")]["spec"]["template"]["spec"]
        if ds["containers"][0]["image"] != "registry.example/pyebpf:9.9.9":
            fail(f"image values not used: {ds['containers'][0]['image']}")
        cfg = yaml.safe_load(ex[("ConfigMap", "pyebpf")]["data"]["pyebpf.yaml"])
        want = {
            "sampling": {"rate_hz": 49},
            "pyroscope": CASES["exports"]["pyroscope"]["url"],
            "otlp": CASES["exports"]["otlp"]["endpoint"],
            "include": CASES["exports"]["include"],
            "window": 30,
        }
        got = {
            "sampling": cfg["sampling"],
            "pyroscope": cfg["outputs"]["pyroscope"]["url"],
            "otlp": cfg["outputs"]["otlp"]["endpoint"],
            "include": cfg["discovery"]["include"],
            "window": cfg["aggregation"]["window_secs"],
        }
        if got != want:
            fail(f"values not carried into the configuration: {got} != {want}")
        if any(k[0] == "NetworkPolicy" for k in ex):
            fail("networkPolicy.enabled=false still renders a NetworkPolicy")
        res = ds["containers"][0]["resources"]
        # Helm merges maps: the default cpu limit stays.
        if res != {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}:
            fail(f"resources not used: {res}")

        # The defaults against the plain manifest.
        with open("deploy/kubernetes/daemonset.yaml") as f:
            plain = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}
        dflt = rendered["defaults"]
        if set(plain) != set(dflt):
            fail(f"objects differ: chart {sorted(dflt)} vs manifest {sorted(plain)}")
        pod_c = dflt[("DaemonSet", "pyebpf")]["spec"]["template"]
        pod_p = plain[("DaemonSet", "pyebpf")]["spec"]["template"]
        if pod_c["spec"] != pod_p["spec"]:
            for k in sorted(set(pod_c["spec"]) | set(pod_p["spec"])):
                if pod_c["spec"].get(k) != pod_p["spec"].get(k):
                    print(f"  {k}:\n    chart:    {pod_c['spec'].get(k)}\n    manifest: {pod_p['spec'].get(k)}")
            fail("the chart's default pod spec differs from deploy/kubernetes/daemonset.yaml")
        ann = {k: v for k, v in pod_c["metadata"]["annotations"].items() if not k.startswith("checksum/")}
        if ann != pod_p["metadata"]["annotations"]:
            fail(f"pod annotations differ: {ann} vs {pod_p['metadata']['annotations']}")
        image = pod_c["spec"]["containers"][0]["image"]
        if image != f"{a.image}:{a.version}":
            fail(f"default image {image} != {a.image}:{a.version}")
        cfg_c = strip_empty(yaml.safe_load(dflt[("ConfigMap", "pyebpf")]["data"]["pyebpf.yaml"]))
        cfg_p = strip_empty(yaml.safe_load(plain[("ConfigMap", "pyebpf")]["data"]["pyebpf.yaml"]))
        if cfg_c != cfg_p:
            fail(f"default configuration differs:\n  chart:    {cfg_c}\n  manifest: {cfg_p}")
        np_c = copy.deepcopy(dflt[("NetworkPolicy", "pyebpf")]["spec"])
        np_p = copy.deepcopy(plain[("NetworkPolicy", "pyebpf")]["spec"])
        np_c.pop("podSelector")
        np_p.pop("podSelector")
        if np_c != np_p:
            fail(f"NetworkPolicy differs:\n  chart:    {np_c}\n  manifest: {np_p}")
        print("helm_check: defaults: same pod spec, configuration and NetworkPolicy as deploy/kubernetes/daemonset.yaml")

        path = chart.save(a.package_dir)
        print(f"helm_check: packaged {path}")


if __name__ == "__main__":
    main()
