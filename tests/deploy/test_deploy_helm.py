"""The Helm chart (deploy/k8s/xshare-sglang), validated offline.

Rendered and linted with the Helm v4 Go library (helm-python-sdk), core kinds validated with
kubernetes-validate --strict (pod templates of custom resources too, as core PodTemplates), custom resources
(LeaderWorkerSet, PodMonitor, RayCluster) against the openAPIV3Schema of their published CRDs in ../shared/crds
made strict (unknown fields are errors), and chart tests: given values -> expected objects and fields.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import DASHBOARD, ROOT, SHARED, require_module

DEPLOY_TOOLS = "installed by scripts/install_deploy_tools.sh"
helm = require_module("helm_python", f"helm-python-sdk, {DEPLOY_TOOLS}")
yaml = require_module("yaml", DEPLOY_TOOLS)
kv = require_module("kubernetes_validate", DEPLOY_TOOLS)
jsonschema = require_module("jsonschema", DEPLOY_TOOLS)

CHART = ROOT / "deploy" / "k8s" / "xshare-sglang"
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
CRDS = SHARED / "crds"
KUBE_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as ch:
        yield ch


def render(chart, values=None, name="xs", namespace="llm") -> dict[str, dict]:
    """kind/name -> object of the rendered manifest."""
    out = chart.render(values or {}, name=name, namespace=namespace)
    objs = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in objs, f"duplicate {key}"
                objs[key] = doc
    return objs


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def one(objs, kind):
    found = [o for k, o in objs.items() if k.startswith(kind + "/")]
    assert len(found) == 1, f"{kind}: {list(objs)}"
    return found[0]


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# -- lint and schema ----------------------------------------------------------------------------------
def test_lint_is_clean():
    res = helm.lint(str(CHART), strict=True)
    assert res["errors"] == []
    assert [m for m in res["messages"] if m["severity"] > 1] == [], res["messages"]  # INFO (icon) only


@pytest.mark.parametrize(
    "values, path",
    [
        ({"nodes": "2"}, "/nodes"),
        ({"mode": "multi"}, "/mode"),
        ({"gpusPerNode": -1}, "/gpusPerNode"),
        ({"xshare": {"budget": 0}}, "/xshare/budget"),
        ({"xshare": {"budget": 1.5}}, "/xshare/budget"),
        ({"xshare": {"policy": "random"}}, "/xshare/policy"),
        ({"xshare": {"budgte": 3}}, "budgte"),
        ({"lws": {"restartPolicy": "Always"}}, "/lws/restartPolicy"),
        ({"server": {"port": 70000}}, "/server/port"),
        ({"metrics": {"podMonitor": {"interval": 15}}}, "/metrics/podMonitor/interval"),
        ({"probes": {"startup": {"path": "health"}}}, "/probes/startup/path"),
    ],
)
def test_schema_rejects_bad_values(chart, values, path):
    with pytest.raises(helm.HelmValuesError, match=path):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="xs", namespace="llm")


@pytest.mark.parametrize("name", ["1x8.yaml", "2x8-lws.yaml", "2x8-ray.yaml"])
def test_examples_pass_the_schema(chart, name):
    chart.validate_schema(example(name))


def test_template_checks_fail_with_a_clear_message(chart):
    with pytest.raises(helm.HelmRenderError, match="nodes=2 needs mode lws or ray"):
        chart.render({"nodes": 2}, name="xs", namespace="llm")
    with pytest.raises(helm.HelmRenderError, match="claimName"):
        chart.render({"model": {"volume": {"type": "pvc", "claimName": ""}}}, name="xs", namespace="llm")


# -- chart tests: values -> objects -------------------------------------------------------------------
def test_single_node_deployment(chart):
    objs = render(chart, example("1x8.yaml"))
    assert {k.split("/")[0] for k in objs} == {"Deployment", "Service", "ConfigMap", "Secret", "PodMonitor"}
    dep = one(objs, "Deployment")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["xshare.io/role"] == "leader"
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    args = c["args"]
    assert args[args.index("--model-path") + 1] == "/models/Qwen3-30B-A3B"
    assert args[args.index("--tp-size") + 1] == "8" and args[args.index("--ep-size") + 1] == "8"
    assert "--enable-metrics" in args and args[-4:] == ["--host", "0.0.0.0", "--port", "30000"]
    assert "--nnodes" not in args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = env_of(c)
    assert env["XSHARE_ENABLE"] == "1" and env["XSHARE_POLICY"] == "xshare_ep" and env["XSHARE_BUDGET"] == "0.5"
    assert env["XSHARE_GPU_CAP"] == "12" and "XSHARE_GROUP_BUDGET" not in env
    assert env["XSHARE_ADMIN_TOKEN_FILE"] == "/var/run/secrets/xshare-admin/token"
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["model"]["persistentVolumeClaim"]["claimName"] == "models"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["admin-token"]["secret"]["secretName"] == "xs-xshare-sglang-admin"
    secret = one(objs, "Secret")
    import base64

    assert len(base64.b64decode(secret["data"]["token"])) == 40  # generated
    pm = one(objs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http"]


def test_plugin_accepts_the_rendered_settings(chart):
    """The XSHARE_* environment the chart renders is what the plugin's own settings loader accepts."""
    from xshare.sglang.settings import load_settings

    for name in ("1x8.yaml", "2x8-lws.yaml"):
        objs = render(chart, example(name))
        obj = objs.get("Deployment/xs-xshare-sglang") or one(objs, "LeaderWorkerSet")
        if obj["kind"] == "Deployment":
            spec = obj["spec"]["template"]
        else:
            spec = obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        env = {k: v for k, v in env_of(spec["spec"]["containers"][0]).items()
               if k.startswith("XSHARE_") and v is not None}
        env.pop("XSHARE_ADMIN_TOKEN_FILE")
        s = load_settings(env)
        assert s.enabled and s.selector.policy == "xshare_ep" and s.selector.budget == 0.5
    values = {"xshare": {"policy": "lynx", "budget": 16, "groupBudget": 0.25, "warmupK": 2,
                         "applyPrefill": True, "extra": {"lynx_alpha": 0.5}, "env": {"stats_every": 32}}}
    c = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env["XSHARE_EXTRA"] == '{"lynx_alpha":0.5}' and env["XSHARE_STATS_EVERY"] == "32"
    env.pop("XSHARE_ADMIN_TOKEN_FILE")
    s = load_settings({k: v for k, v in env.items() if k.startswith("XSHARE_")})
    assert (s.selector.policy, s.selector.budget, s.selector.group_budget, s.selector.warmup_k) == (
        "lynx", 16, 0.25, 2)
    assert s.apply_prefill and s.stats_every == 32


def test_lws_group(chart):
    objs = render(chart, example("2x8-lws.yaml"))
    assert {k.split("/")[0] for k in objs} == {"LeaderWorkerSet", "Service", "ConfigMap", "PodMonitor"}  # secret exists
    lws = one(objs, "LeaderWorkerSet")
    t = lws["spec"]["leaderWorkerTemplate"]
    assert t["size"] == 2 and t["restartPolicy"] == "RecreateGroupOnPodRestart" and lws["spec"]["replicas"] == 1
    leader = t["leaderTemplate"]["spec"]["containers"][0]
    workers = {c["name"]: c for c in t["workerTemplate"]["spec"]["containers"]}
    worker = workers["sglang"]
    for c in (leader, worker):
        a = c["args"]
        assert a[a.index("--nnodes") + 1] == "$(LWS_GROUP_SIZE)"
        assert a[a.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
        assert a[a.index("--dist-init-addr") + 1] == "$(LWS_LEADER_ADDRESS):20000"
        assert a[a.index("--tp-size") + 1] == "16" and a[a.index("--ep-size") + 1] == "16"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        idx = next(e for e in c["env"] if e["name"] == "LWS_WORKER_INDEX")
        assert "worker-index" in idx["valueFrom"]["fieldRef"]["fieldPath"]
        # $(VAR) references resolve only against variables defined in the container's env or by LWS
        assert c["env"][0]["name"] == "LWS_WORKER_INDEX"
    # every rank gets --host/--port: node rank 0 serves the API there, the others SGLang's per-node server
    # (/health, and /metrics of that node's processes with --enable-metrics)
    for c in (leader, worker):
        assert c["args"][-4:] == ["--host", "0.0.0.0", "--port", "30000"]
        assert c["ports"][0] == {"name": "http", "containerPort": 30000, "protocol": "TCP"}
    assert list(workers) == ["sglang"]
    assert "readinessProbe" in leader and "startupProbe" in leader
    assert "readinessProbe" not in worker and worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert worker["startupProbe"]["httpGet"]["path"] == "/health"
    assert t["leaderTemplate"]["metadata"]["labels"]["xshare.io/role"] == "leader"
    assert t["workerTemplate"]["metadata"]["labels"]["xshare.io/role"] == "worker"
    vols = {v["name"]: v for v in t["leaderTemplate"]["spec"]["volumes"]}
    assert vols["admin-token"]["secret"]["secretName"] == "xshare-admin"  # existingSecret
    svc = one(objs, "Service")
    assert svc["spec"]["selector"]["xshare.io/role"] == "leader"
    assert svc["spec"]["selector"]["app.kubernetes.io/instance"] == "xs"
    pm = one(objs, "PodMonitor")
    assert [(e["port"], e["path"]) for e in pm["spec"]["podMetricsEndpoints"]] == [("http", "/metrics")]
    sel = pm["spec"]["selector"]["matchLabels"]
    assert "xshare.io/role" not in sel  # every pod, leader and workers
    for tmpl in (t["leaderTemplate"], t["workerTemplate"]):
        assert all(tmpl["metadata"]["labels"][k] == v for k, v in sel.items())
    assert pm["spec"]["namespaceSelector"]["matchNames"] == ["llm"]
    # the colon-restoring relabeling, the same rule the dashboard tests run on a real Prometheus
    from xshare.deploy.promql import COLON_RESTORE_RELABEL as rule

    (mr,) = pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    assert mr == {"sourceLabels": rule["source_labels"], "regex": rule["regex"], "targetLabel": rule["target_label"],
                  "replacement": rule["replacement"]}


def test_dashboard_configmap(chart):
    values = {"dashboard": {"labels": {"grafana_dashboard": "1"}, "annotations": {"grafana_folder": "LLM"}}}
    objs = render(chart, values)
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert cm["data"] == {"xshare-sglang.json": DASHBOARD.read_text()}
    assert json.loads(cm["data"]["xshare-sglang.json"])["uid"] == "xshare-sglang"
    assert not any(k.startswith("ConfigMap/") for k in render(chart, {"dashboard": {"enabled": False}}))
    assert not any(k.startswith("PodMonitor/") for k in render(chart, {"metrics": {"podMonitor": {"enabled": False}}}))


def test_helm_package_carries_the_dashboard(tmp_path):
    """`helm package` of the chart folder on its own (copied out of the repository with its links kept as links, as
    a chart repository or a vendoring step gets it) writes an archive that holds the dashboard, and the chart loaded
    back from that archive renders the dashboard ConfigMap from it."""
    alone = tmp_path / "src" / "xshare-sglang"
    shutil.copytree(CHART, alone, symlinks=True)
    archive = helm.package(alone, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        member = "xshare-sglang/dashboards/xshare-sglang.json"
        assert member in names, names
        data = tar.extractfile(member).read().decode()
    assert data == DASHBOARD.read_text()
    assert [n for n in names if n.startswith("xshare-sglang/dashboards/")] == [member]  # nothing else of dashboards/
    with helm.Chart.load(archive) as packaged:
        assert one(render(packaged), "ConfigMap")["data"] == {"xshare-sglang.json": data}


def test_ray_cluster_runs_the_launcher(chart):
    objs = render(chart, example("2x8-ray.yaml"))
    assert {k.split("/")[0] for k in objs} == {"RayCluster", "Service", "ConfigMap", "Secret", "PodMonitor"}
    rc = one(objs, "RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = rc["spec"]["headGroupSpec"]["template"]
    (wg,) = rc["spec"]["workerGroupSpecs"]
    assert wg["replicas"] == wg["minReplicas"] == wg["maxReplicas"] == 1
    hc = head["spec"]["containers"][0]
    wc = wg["template"]["spec"]["containers"][0]
    assert hc["resources"]["limits"]["nvidia.com/gpu"] == "8" and wc["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "readinessProbe" in hc and "readinessProbe" not in wc
    assert head["metadata"]["labels"]["xshare.io/role"] == "leader"
    assert wg["template"]["metadata"]["labels"]["xshare.io/role"] == "worker"
    script = hc["args"][0]
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)[1:]
    assert argv[:2] == ["xshare", "launch"]
    # the command line the chart writes is one the real `xshare launch` parser accepts, with the intended config
    from xshare.cli import build_parser
    from xshare.commands.launch import build_config

    args, extra = build_parser().parse_known_args(argv[1:])
    args._extra = extra
    cfg = build_config(args)
    assert (cfg.nnodes, cfg.gpus_per_node, cfg.port, cfg.rank0_on_head) == (2, 8, 30000, True)
    assert cfg.worker_port == 30000 and cfg.max_restarts == 5 and cfg.pg_timeout == 1800
    assert cfg.server_cmd == "python3 -m sglang.launch_server"
    sa = cfg.server_args
    assert sa[sa.index("--model-path") + 1] == "/models/Qwen3-235B-A22B" and sa[sa.index("--tp-size") + 1] == "16"
    assert cfg.argv(1, "10.0.0.1:1234")[-6:] == ["--nnodes", "2", "--node-rank", "1", "--dist-init-addr",
                                                 "10.0.0.1:1234"]
    assert wc["ports"] == [{"name": "http", "containerPort": 30000, "protocol": "TCP"}]
    assert env_of(wc)["XSHARE_POLICY"] == "xshare_ep"  # the agents' servers inherit the worker pod's env
    assert "--block" in wc["args"][0]
    pm = one(objs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http"]
    assert all(wg["template"]["metadata"]["labels"][k] == v for k, v in pm["spec"]["selector"]["matchLabels"].items())


# -- schemas: core kinds (kubernetes-validate) and custom resources (their CRDs) ----------------------
CORE = {"Deployment", "Service", "ConfigMap", "Secret"}
MATRIX = [{}, example("1x8.yaml"), example("2x8-lws.yaml"), example("2x8-ray.yaml"),
          {"mode": "lws", "nodes": 4, "model": {"volume": {"type": "hostPath", "hostPath": "/data/models"}},
           "hostNetwork": True, "runtimeClassName": "nvidia", "podAnnotations": {"a": "b"}, "podLabels": {"team": "x"},
           "resources": {"requests": {"cpu": "32", "memory": "512Gi"}, "limits": {"memory": "900Gi"}},
           "admin": {"enabled": False}, "xshare": {"enabled": False}}]


def _pod_templates(obj):
    if obj["kind"] == "Deployment":
        yield obj["spec"]["template"]
    elif obj["kind"] == "LeaderWorkerSet":
        yield obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        yield obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    elif obj["kind"] == "RayCluster":
        yield obj["spec"]["headGroupSpec"]["template"]
        for g in obj["spec"]["workerGroupSpecs"]:
            yield g["template"]


@pytest.mark.parametrize("i", range(len(MATRIX)))
def test_core_kinds_and_pod_templates_validate_strictly(chart, i):
    objs = render(chart, MATRIX[i])
    n = 0
    for obj in objs.values():
        if obj["kind"] in CORE:
            kv.validate(obj, KUBE_VERSION, strict=True)
            n += 1
        for t in _pod_templates(obj):
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t},
                        KUBE_VERSION, strict=True)
            n += 1
    assert n >= 3


def test_kubernetes_validate_catches_a_broken_core_object(chart):
    dep = one(render(chart), "Deployment")
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["portz"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)


def test_kubernetes_validate_cli_on_rendered_files(chart, tmp_path):
    """The CLI form (`kubernetes-validate --strict`), as documented in deploy/README.md."""
    objs = render(chart, example("1x8.yaml"))
    files = []
    for key, obj in objs.items():
        if obj["kind"] in CORE:
            f = tmp_path / (key.replace("/", "_") + ".yaml")
            f.write_text(yaml.safe_dump(obj))
            files.append(str(f))
    exe = Path(sys.executable).with_name("kubernetes-validate")
    r = subprocess.run([str(exe), "--strict", "-k", KUBE_VERSION, *files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("INFO") >= len(files)


def _strict(schema):
    """A CRD's openAPIV3Schema as a strict JSON schema: unknown fields are errors (like kubeconform -strict)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s and "additionalProperties" not in s and not schema.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


def _crd_validator(filename, version):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are large
    docs = [d for d in yaml.load_all((CRDS / filename).read_text(), Loader=loader) if d]
    (crd,) = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(ver["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema), f"{crd['spec']['group']}/{version}", crd["spec"]["names"]["kind"]


CR_SCHEMAS = {
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io_leaderworkersets.yaml", "v1"),
    "PodMonitor": ("monitoring.coreos.com_podmonitors.yaml", "v1"),
    "RayCluster": ("ray.io_rayclusters.yaml", "v1"),
}


@pytest.fixture(scope="module")
def crd_validators():
    if not CRDS.is_dir():
        pytest.fail(f"CRDs missing: {CRDS} (the shared folder next to the repository)")
    return {kind: _crd_validator(*spec) for kind, spec in CR_SCHEMAS.items()}


def _check_cr(validators, obj):
    validator, api_version, kind = validators[obj["kind"]]
    assert obj["apiVersion"] == api_version and obj["kind"] == kind
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("i", range(len(MATRIX)))
def test_custom_resources_match_their_crds(chart, crd_validators, i):
    objs = render(chart, MATRIX[i])
    crs = [o for o in objs.values() if o["kind"] in CR_SCHEMAS]
    assert crs
    for obj in crs:
        assert _check_cr(crd_validators, obj) == [], obj["kind"]


def test_crd_check_catches_broken_custom_resources(chart, crd_validators):
    lws = one(render(chart, example("2x8-lws.yaml")), "LeaderWorkerSet")
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    assert any("restartPolicy" in e for e in _check_cr(crd_validators, bad))
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["sise"] = 2  # unknown field: strict
    assert any("sise" in e for e in _check_cr(crd_validators, bad))
    pm = one(render(chart), "PodMonitor")
    bad = copy.deepcopy(pm)
    bad["spec"]["podMetricsEndpoints"][0]["prt"] = "http"
    assert any("prt" in e for e in _check_cr(crd_validators, bad))
    rc = one(render(chart, example("2x8-ray.yaml")), "RayCluster")
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert any("replicas" in e for e in _check_cr(crd_validators, bad))


def test_admin_state_on_the_pod_that_serves_http_only(chart):
    """The config in force is kept where node rank 0's pod mounts XSHARE_ADMIN_STATE_DIR (emptyDir by default, an
    existing claim with type pvc, nothing with none); worker pods get no state: nothing needs shared storage."""
    t = one(render(chart, example("2x8-lws.yaml")), "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = t["leaderTemplate"]["spec"]["containers"][0]
    assert env_of(leader)["XSHARE_ADMIN_STATE_DIR"] == "/var/lib/xshare-admin"
    assert {"name": "admin-state", "mountPath": "/var/lib/xshare-admin"} in leader["volumeMounts"]
    vols = {v["name"]: v for v in t["leaderTemplate"]["spec"]["volumes"]}
    assert vols["admin-state"] == {"name": "admin-state", "emptyDir": {}}
    worker = t["workerTemplate"]["spec"]["containers"][0]
    assert "XSHARE_ADMIN_STATE_DIR" not in env_of(worker)
    assert "admin-state" not in {v["name"] for v in t["workerTemplate"]["spec"]["volumes"]}
    dep = one(render(chart, {"admin": {"state": {"type": "pvc", "claimName": "xshare-state"}}}), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["admin-state"]["persistentVolumeClaim"] == {
        "claimName": "xshare-state"}
    off = one(render(chart, {"admin": {"state": {"type": "none"}}}), "Deployment")["spec"]["template"]["spec"]
    assert "XSHARE_ADMIN_STATE_DIR" not in env_of(off["containers"][0])
    assert "admin-state" not in {v["name"] for v in off["volumes"]}
    ray = one(render(chart, example("2x8-ray.yaml")), "RayCluster")["spec"]
    head = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["XSHARE_ADMIN_STATE_DIR"] == "/var/lib/xshare-admin"  # --rank0-on-head
