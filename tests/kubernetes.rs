//! The Kubernetes manifests as operators use them: every Kustomize rendering (the base and each
//! overlay) made by `kubectl kustomize`, checked by the strict validator against the oldest
//! Kubernetes it is for (the ServiceMonitor, a CRD, against the Prometheus Operator's models), and
//! then read for what it must mean: the sidecar starts before the application and stops after it,
//! both share the socket, the metrics reach the ServiceMonitor, the budget covers the pods.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use cacheward::dev::install::{self, Tool};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// Everything a tool printed, stdout then stderr.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A rendering: the YAML `kubectl kustomize` printed (in a file), and its documents.
struct Rendering {
    _dir: tempfile::TempDir,
    file: PathBuf,
    documents: Vec<Value>,
}

impl Rendering {
    fn of(kustomization: &str) -> Rendering {
        install::ensure(Tool::Kubectl).expect("kubectl");
        install::ensure(Tool::KubernetesValidate).expect("the validator's virtualenv");
        let out = Command::new(install::tools().join("kubectl"))
            .arg("kustomize")
            .arg(k8s().join(kustomization))
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl kustomize {kustomization}: {}",
            said(&out)
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &out.stdout).unwrap();
        // Also checks every ServiceMonitor against the operator's models.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/k8s_documents.py");
        let json = Command::new(install::venv().join("bin/python"))
            .arg(script)
            .arg(&file)
            .output()
            .expect("python");
        assert!(json.status.success(), "{kustomization}: {}", said(&json));
        let documents = serde_json::from_slice::<Vec<Value>>(&json.stdout).unwrap();
        Rendering {
            _dir: dir,
            file,
            documents,
        }
    }

    /// `kubernetes-validate --strict` against Kubernetes `version`: the output, and whether it passed.
    fn validate(&self, version: &str) -> (bool, String) {
        validate(&self.file, version)
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .documents
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} in {:#?}", self.documents);
        found[0]
    }

    fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self
            .documents
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        kinds.sort();
        kinds
    }
}

fn validate(file: &Path, version: &str) -> (bool, String) {
    let out = Command::new(install::venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .arg(file)
        .output()
        .expect("kubernetes-validate");
    (out.status.success(), said(&out))
}

/// The containers of a pod template's list (`containers` or `initContainers`), by name.
fn names(spec: &Value, list: &str) -> Vec<String> {
    spec[list]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {list}: {spec:#}"))
}

/// Whether every label `selector` asks for is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.as_object().expect("a label map");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k] == *v)
}

#[test]
fn every_rendering_is_strictly_valid_for_the_kubernetes_it_is_for() {
    // The base and the production overlay need native sidecars (1.29); the classic overlay is for
    // older clusters: it validates against the oldest schema the validator has, where the base
    // does not (an init container's restartPolicy is unknown there), which shows the validator
    // reads the field the overlay removes.
    for (kustomization, version) in [
        ("base", "1.29.0"),
        ("overlays/production", "1.29.0"),
        ("overlays/classic", "1.25.0"),
    ] {
        let rendering = Rendering::of(kustomization);
        let (passed, said) = rendering.validate(version);
        assert!(passed, "{kustomization} on {version}:\n{said}");
        let validated = rendering
            .documents
            .iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .count();
        assert_eq!(
            said.matches(" passed for resource ").count(),
            validated,
            "{kustomization}: every resource but the ServiceMonitor has a schema:\n{said}"
        );
        if kustomization == "base" {
            let (passed, said) = rendering.validate("1.25.0");
            assert!(
                !passed && said.contains("'restartPolicy' was unexpected"),
                "{said}"
            );
        }
    }
    let (passed, said) = validate(&k8s().join("secret.example.yaml"), "1.25.0");
    assert!(passed, "{said}");
}

#[test]
fn the_sidecar_starts_first_stops_last_shares_the_socket_and_is_scraped() {
    let production = Rendering::of("overlays/production");
    assert_eq!(
        production.kinds(),
        [
            "ConfigMap",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor"
        ]
    );
    let deployment = production.one("Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    // A native sidecar: an init container that keeps running, the application started only once
    // its startup probe (`cacheward health`: both backends reached) passes.
    assert_eq!(names(spec, "initContainers"), ["cacheward"]);
    assert_eq!(names(spec, "containers"), ["app"]);
    let sidecar = container(spec, "initContainers", "cacheward");
    assert_eq!(sidecar["restartPolicy"], "Always");
    let startup = &sidecar["startupProbe"]["exec"]["command"];
    assert_eq!(startup[0], "/cacheward");
    assert_eq!(startup[1], "health");
    assert_eq!(sidecar["livenessProbe"]["exec"]["command"][1], "stats");
    assert_eq!(
        sidecar["image"],
        format!("registry.example.com/cacheward:{VERSION}")
    );
    // The socket's directory is one emptyDir that both mount where the configuration puts it.
    let socket_volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["emptyDir"].is_object())
        .expect("an emptyDir");
    for (list, name) in [("initContainers", "cacheward"), ("containers", "app")] {
        let mounts = container(spec, list, name)["volumeMounts"]
            .as_array()
            .unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["name"] == socket_volume["name"] && m["mountPath"] == "/run/cacheward"),
            "{name} does not mount the socket's directory"
        );
    }
    let configmap = production.one("ConfigMap");
    let toml = configmap["data"]["cacheward.toml"].as_str().unwrap();
    assert!(
        toml.contains("path = \"/run/cacheward/cacheward.sock\""),
        "{toml}"
    );
    // The generated ConfigMap (its name carries its content's hash: a change rolls the pods) is
    // the one the sidecar and the migration Job mount.
    let job = production.one("Job");
    for spec in [spec, &job["spec"]["template"]["spec"]] {
        assert!(
            spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["configMap"]["name"] == configmap["metadata"]["name"]),
            "{spec:#}"
        );
    }
    // Each release's migration Job is a new one.
    let job_name = job["metadata"]["name"].as_str().unwrap();
    assert!(job_name.ends_with(&format!("-{VERSION}")), "{job_name}");
    // The metrics: the port the daemon listens on is the container's `metrics` port, which the
    // headless Service exposes for the application's pods and the ServiceMonitor scrapes.
    let listen = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CACHEWARD__METRICS__LISTEN")
        .expect("metrics.listen set")["value"]
        .as_str()
        .unwrap();
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let declared = sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a metrics port");
    assert_eq!(declared["containerPort"], port);
    let service = production.one("Service");
    assert!(selects(
        &service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    assert_eq!(service["spec"]["clusterIP"], "None");
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], "metrics");
    let monitor = production.one("ServiceMonitor");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service_port["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    // The disruption budget covers the application's pods, one at a time.
    let budget = production.one("PodDisruptionBudget");
    assert!(selects(
        &budget["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    // The drain after SIGTERM (10 s) fits the grace period.
    assert!(spec["terminationGracePeriodSeconds"].as_u64().unwrap() >= 20);

    // The classic form: the same sidecar as an ordinary container, nothing left of the native one.
    let classic = Rendering::of("overlays/classic");
    let spec = &classic.one("Deployment")["spec"]["template"]["spec"];
    assert!(spec.get("initContainers").is_none(), "{spec:#}");
    assert_eq!(names(spec, "containers"), ["app", "cacheward"]);
    let sidecar = container(spec, "containers", "cacheward");
    assert!(sidecar.get("restartPolicy").is_none());
    assert_eq!(sidecar["image"], format!("cacheward:{VERSION}"));
    assert_eq!(
        classic.kinds(),
        ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget"]
    );
}
