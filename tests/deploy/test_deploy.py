"""The Kubernetes manifests: `kubectl kustomize` (Debian's kubectl, `make deps-system`) renders deploy/k8s
(the GPU deployment) and deploy/k8s/cpu-demo (the tiny preset); every built-in object validates against
the Kubernetes JSON schemas of K8S_VERSION with kubernetes-validate (offline, strict: unknown fields are
errors); custom resources (the ServiceMonitor) have no schema there and are only warned about. Then the
properties the deployment promises: one GPU per pod, probes, drain, non-root read-only root filesystem
with every writable path mounted, the shared volumes, the Secret, and objects that select each other."""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest
import yaml

from conftest import system_tool
from server import ROOT
from spo_runtime.settings import Settings

K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.31.0"  # the schemas validated against (kubernetes-validate bundles 1.25 .. 1.37)
CUSTOM_KINDS = {"ServiceMonitor"}  # custom resources: no schema in kubernetes-validate


def render(path) -> dict[str, dict]:
    kubectl = system_tool("kubectl", "kubernetes-client")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    objects = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(objects) == len(docs), "two objects with one kind and name"
    return objects


@pytest.fixture(scope="module", params=["gpu", "cpu-demo"])
def rendered(request):
    return request.param, render(K8S if request.param == "gpu" else K8S / "cpu-demo")


def test_every_builtin_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate as kv

    name, objects = rendered
    assert {k.split("/")[0] for k in objects} >= {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                                                   "HorizontalPodAutoscaler", "ServiceMonitor"}
    for key, obj in objects.items():
        try:
            assert kv.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION.rsplit(".", 1)[0]
        except kv.SchemaNotFoundError:
            assert obj["kind"] in CUSTOM_KINDS, f"{name}: no schema for {key}"
            warnings.warn(f"{name}: {key} is a custom resource ({obj['apiVersion']}): not validated", stacklevel=1)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {key} at {'.'.join(map(str, e.path))}: {e.message}")


def test_the_validator_rejects_a_misspelt_field():
    """strict=True has teeth: an unknown field (a typo) in the Deployment is an error, not ignored."""
    import kubernetes_validate as kv

    dep = render(K8S)["Deployment/spo-serve"]
    dep["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 10
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)


def _pod(objects) -> dict:
    return objects["Deployment/spo-serve"]["spec"]["template"]


def _container(objects) -> dict:
    (c,) = _pod(objects)["spec"]["containers"]
    return c


def _env(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_probes_drain_and_security(rendered):
    name, objects = rendered
    pod = _pod(objects)["spec"]
    c = _container(objects)
    env = _env(c)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 3000}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    start = c["startupProbe"]
    assert start["httpGet"]["port"] == "http"
    budget = start["periodSeconds"] * start["failureThreshold"]
    # the start the probe waits for: SDXL from the filled cache volume (the init container downloaded it) and one
    # warm-up image, no compile (estimated 1-3 min, so 10 min); the tiny preset in seconds (measured 28 s median)
    assert (600 <= budget <= 900) if name == "gpu" else (120 <= budget <= 600), budget
    assert "SPO_COMPILE" not in env
    # SIGTERM: preStop, then the drain (SPO_DRAIN_S), then shutdown, all inside the grace period
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["SPO_DRAIN_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 15
    # non-root, read-only root filesystem, nothing extra
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for k in pod.get("initContainers", []) + [c]:
        sc = k["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_every_writable_path_is_a_mounted_volume(rendered):
    _, objects = rendered
    pod = _pod(objects)["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    for k in pod.get("initContainers", []) + pod["containers"]:
        mounts = [m["mountPath"] for m in k["volumeMounts"]]
        assert {m["name"] for m in k["volumeMounts"]} <= volumes
        assert "/tmp" in mounts, k["name"]
        for var in ("SPO_DATA_DIR", "HF_HOME", "BENTOML_HOME", "HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR",
                    "TRITON_CACHE_DIR"):
            value = _env(k).get(var, {}).get("value")
            if value is not None:
                assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts), (k["name"], var, value)


def test_environment_names_real_settings_and_the_token_comes_from_a_secret(rendered):
    _, objects = rendered
    env = _env(_container(objects))
    known = {Settings.variable(f) for f in Settings.model_fields}
    assert {n for n in env if n.startswith("SPO_")} <= known, "an SPO_ variable the server does not read"
    # the literal values parse (ConfigError naming the variable otherwise)
    Settings.from_env({k: v["value"] for k, v in env.items() if k.startswith("SPO_") and "value" in v})
    ref = env["SPO_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and not ref.get("optional", False), "the admin token must come from a Secret"
    assert "value" not in env["SPO_ADMIN_TOKEN"]
    # the generation routes are closed in the cluster: the same Secret's api-token, required
    api = env["SPO_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (api["name"], api["key"]) == (ref["name"], "api-token") and not api.get("optional", False)
    # the weight sources live in one ConfigMap that every container reads, its keys real settings too
    pod = _pod(objects)["spec"]
    for k in pod.get("initContainers", []) + pod["containers"]:
        (source,) = k["envFrom"]
        cm = objects[f"ConfigMap/{source['configMapRef']['name']}"]
        assert set(cm.get("data") or {}) <= known, k["name"]


def test_defaults_have_one_source_of_truth_the_server(rendered, tmp_path, monkeypatch):
    """The manifests set no speed path (the server's defaults: off until measured, docs/performance.md), no
    compiler cache directory (the server keeps inductor's, and Triton's under it, in SPO_DATA_DIR/compile_cache),
    and no replica count: the HorizontalPodAutoscaler owns it."""
    _, objects = rendered
    env = _env(_container(objects))
    speed = {"SPO_COMPILE", "SPO_COMPILE_MODE", "SPO_COMPILE_BACKEND", "SPO_COMPILE_VAE", "SPO_BATCH_BUCKETS",
             "SPO_QUANT", "SPO_SDPA_BACKEND", "SPO_LORA_ROW_SUBSET"}
    assert not speed & set(env), speed & set(env)
    assert not {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"} & set(env)
    from spo_runtime.speed.compiling import CompileCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # what a manifest would set is not honoured:
    CompileCache(tmp_path / "compile_cache", {"preset": "tiny"}).activate()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path.resolve()))
    dep = objects["Deployment/spo-serve"]
    hpa = objects["HorizontalPodAutoscaler/spo-serve"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"


def test_gpu_deployment_one_gpu_per_pod_shared_data_and_model_cache():
    objects = render(K8S)
    c = _container(objects)
    env = _env(c)
    pod = _pod(objects)["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["SPO_WORKERS"]["value"] == "auto" and env["SPO_MODEL"]["value"] == "sdxl-spo"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    data = objects[f"PersistentVolumeClaim/{claims[mounts[env['SPO_DATA_DIR']['value']]]}"]
    assert data["spec"]["accessModes"] == ["ReadWriteMany"], "SPO_DATA_DIR is shared by every pod"
    models = objects[f"PersistentVolumeClaim/{claims[mounts[env['HF_HOME']['value']]]}"]
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["HF_HUB_OFFLINE"]["value"] == "1", "the server starts offline from the filled cache"
    (init,) = pod["initContainers"]
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {env["HF_HOME"]["value"]}
    assert _env(init)["HF_HOME"]["value"] == env["HF_HOME"]["value"] and "HF_HUB_OFFLINE" not in _env(init)
    # the init container fetches what weights.py pins, as the loader would: `python -m spo_runtime download`
    # run from the bento's source tree, with the server's model and the same weight sources (the ConfigMap)
    from spo_runtime.model import weights

    assert init["command"] == ["python", "-m", "spo_runtime", "download"] and not init.get("args")
    assert init["workingDir"] == "/home/bentoml/bento/src" and init["envFrom"] == c["envFrom"]
    assert _env(init)["SPO_MODEL"]["value"] == env["SPO_MODEL"]["value"]
    init_env = {k: v["value"] for k, v in _env(init).items() if k.startswith("SPO_") and "value" in v}
    plan = weights.plan(Settings.from_env(init_env), "sdxl-spo")
    assert [(i.repo, i.revision) for i in plan] == [(weights.PARTS[k].repo, weights.PARTS[k].revision) for k in ("base", "vae", "lora")]


def test_cpu_demo_runs_the_tiny_preset_with_two_workers_and_no_gpu():
    objects = render(K8S / "cpu-demo")
    c = _container(objects)
    env = _env(c)
    pod = _pod(objects)["spec"]
    assert env["SPO_MODEL"]["value"] == "tiny" and env["SPO_WORKERS"]["value"] == "2"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}) and "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert not pod.get("initContainers") and not pod.get("tolerations")
    assert "PersistentVolumeClaim/spo-serve-models" not in objects
    assert all(v.get("persistentVolumeClaim", {}).get("claimName") in (None, "spo-serve-data") for v in pod["volumes"])


def test_objects_select_each_other(rendered):
    _, objects = rendered
    labels = _pod(objects)["metadata"]["labels"]
    dep = objects["Deployment/spo-serve"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = objects["Service/spo-serve"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http"}
    pdb = objects["PodDisruptionBudget/spo-serve"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sm = objects["ServiceMonitor/spo-serve"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", "/metrics")]
    hpa = objects["HorizontalPodAutoscaler/spo-serve"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "spo-serve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "spo_queue_depth"


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    """The adapter rule (helm values) exposes spo_queue_depth per pod, and the server exports that gauge."""
    from prometheus_client import CollectorRegistry

    from spo_runtime.metrics import Metrics

    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa_metric = render(K8S)["HorizontalPodAutoscaler/spo-serve"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric
    assert rule["seriesQuery"].startswith(hpa_metric + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    registry = CollectorRegistry()
    Metrics(registry)
    assert hpa_metric in {f.name for f in registry.collect()}
