//! The Kubernetes manifests in `docker/kubernetes/`: rendered as kustomize would (the
//! `resources` of `kustomization.yaml`, in order), validated against the schemas of a pinned
//! Kubernetes version with PyPI's `kubernetes-validate` (offline; `.ci/run` installs it), and
//! held to what the server reads: every variable they set is one of `.env.example`, and the
//! ports, probes and grace period agree with the settings they give the server.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/kubernetes");

/// The Kubernetes version whose schemas the manifests must pass (one that
/// kubernetes-validate ships; see its pin in `.ci/run`).
const KUBERNETES_VERSION: &str = "1.33.0";

/// Every YAML document of each file, as JSON, in one python3 run (PyYAML comes with
/// kubernetes-validate).
fn load_all(paths: &[PathBuf]) -> Vec<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([list(yaml.safe_load_all(open(p))) for p in sys.argv[1:]]))",
        ])
        .args(paths)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{paths:?}: not YAML (or PyYAML is missing: see .ci/run):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn load(path: &Path) -> Vec<Value> {
    load_all(&[path.to_owned()]).remove(0)
}

/// The files `kustomization.yaml` lists, in order, after checking that the rendering below
/// is all kustomize would do (nothing but `resources`) and that no manifest in the directory
/// is left out.
fn resources(dir: &Path) -> Vec<PathBuf> {
    let [kustomization] = &load(&dir.join("kustomization.yaml"))[..] else {
        panic!("kustomization.yaml: expected one document")
    };
    let fields: BTreeSet<&str> = kustomization
        .as_object()
        .expect("kustomization.yaml: a mapping")
        .keys()
        .map(String::as_str)
        .collect();
    let rendered: BTreeSet<&str> = ["apiVersion", "kind", "resources"].into();
    assert!(
        fields.is_subset(&rendered),
        "kustomization.yaml uses {:?}: this test renders only `resources` (put the rest in an overlay, or render \
         it here too)",
        fields.difference(&rendered).collect::<Vec<_>>()
    );
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: Vec<String> = kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml: resources is a list")
        .iter()
        .map(|r| r.as_str().expect("a resource is a file name").to_owned())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| (name.ends_with(".yaml") || name.ends_with(".yml")) && name != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, on_disk, "every manifest in {} is listed in kustomization.yaml, once", dir.display());
    listed.iter().map(|name| dir.join(name)).collect()
}

/// (file, document) for every object the kustomization renders.
fn render(dir: &Path) -> Vec<(PathBuf, Value)> {
    let files = resources(dir);
    let docs = load_all(&files);
    files
        .into_iter()
        .zip(docs)
        .flat_map(|(path, docs)| docs.into_iter().map(move |doc| (path.clone(), doc)))
        .collect()
}

fn one<'a>(objects: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().map(|(_, o)| o).filter(|o| o["kind"] == kind).collect();
    let [object] = found[..] else { panic!("expected one {kind}, found {}", found.len()) };
    object
}

/// `NAME` for each `NAME=…` or `# NAME=…` line of `.env.example`.
fn env_example_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    text.lines()
        .filter_map(|line| {
            let line = line.strip_prefix("# ").unwrap_or(line);
            let (name, _) = line.split_once('=')?;
            (!name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .then(|| name.to_owned())
        })
        .collect()
}

/// Every variable the Deployments' containers get: `env` entries, and the keys of the
/// ConfigMaps they take whole (`envFrom`). A whole Secret (`envFrom.secretRef`) is refused:
/// its keys cannot be checked, so secrets are named one by one.
fn variables(objects: &[(PathBuf, Value)]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (_, deployment) in objects.iter().filter(|(_, o)| o["kind"] == "Deployment") {
        let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().expect("containers");
        for container in containers {
            for var in container["env"].as_array().into_iter().flatten() {
                let name = var["name"].as_str().expect("env name");
                if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                    assert_eq!(key, name, "a Secret's key is named as the variable it sets");
                }
                names.insert(name.to_owned());
            }
            for source in container["envFrom"].as_array().into_iter().flatten() {
                assert!(
                    source["secretRef"].is_null(),
                    "envFrom secretRef: name each secret variable in `env`"
                );
                let map_name = source["configMapRef"]["name"].as_str().expect("envFrom configMapRef");
                let map = objects
                    .iter()
                    .map(|(_, o)| o)
                    .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
                    .unwrap_or_else(|| panic!("ConfigMap {map_name} is not among the manifests"));
                names.extend(map["data"].as_object().expect("ConfigMap data").keys().cloned());
            }
        }
    }
    names
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files = resources(Path::new(DIR));
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .args(&files)
        .output()
        .expect("python3");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "kubernetes-validate {KUBERNETES_VERSION} --strict (installed by .ci/run) refused the manifests:\n{said}"
    );
    // Unknown kinds are only a warning there (failed above too): make sure each was checked.
    let kinds: BTreeSet<String> =
        render(Path::new(DIR)).iter().map(|(_, o)| o["kind"].as_str().unwrap().to_owned()).collect();
    for kind in [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} among the manifests: {kinds:?}");
    }
}

#[test]
fn manifests_set_only_variables_of_env_example() {
    let known = env_example_names();
    let set = variables(&render(Path::new(DIR)));
    for required in ["DATABASE_URL", "REDIS_URL", "REDIS_CLUSTER_NODES", "KEY_ENCRYPTION_KEY", "SMTP_URL"] {
        assert!(set.contains(required), "the Deployment does not set {required}");
    }
    let unknown: Vec<&String> = set.difference(&known).collect();
    assert!(unknown.is_empty(), "set by the manifests but not in .env.example: {unknown:?}");
}

/// `"30s"`, `"1m"`, `"500ms"` (the forms the ConfigMap uses) in seconds.
fn seconds(value: &str) -> f64 {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (n, unit) = value.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("duration {value:?}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => panic!("duration {value:?}: use ms, s or m here"),
    }
}

#[test]
fn the_deployment_agrees_with_the_settings_it_gives_the_server() {
    let objects = render(Path::new(DIR));
    let config = &one(&objects, "ConfigMap")["data"];
    let deployment = one(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let [container] = &pod["containers"].as_array().unwrap()[..] else { panic!("one container") };

    // The ports the server binds are the ones declared, probed and opened.
    let port_of = |name: &str| {
        container["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).expect(name)["containerPort"]
            .as_u64()
            .unwrap()
    };
    for (variable, name) in [("LISTEN_ADDR", "http"), ("METRICS_ADDR", "metrics")] {
        let addr = config[variable].as_str().unwrap();
        assert!(addr.starts_with("0.0.0.0:"), "{variable}={addr}: a pod must listen beyond loopback");
        assert_eq!(addr.rsplit(':').next().unwrap().parse::<u64>().unwrap(), port_of(name), "{variable}");
    }
    let policy = one(&objects, "NetworkPolicy");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let opened: Vec<(u64, bool)> = rules
        .iter()
        .flat_map(|rule| {
            let from_monitoring = rule["from"].as_array().is_some_and(|from| {
                from.iter().all(|peer| {
                    peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"
                })
            });
            rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |p| (p["port"].as_u64().unwrap(), from_monitoring))
        })
        .collect();
    assert_eq!(
        opened,
        [(port_of("http"), false), (port_of("metrics"), true)],
        "API open, metrics to monitoring only"
    );

    // Probes: liveness never on /ready (a dependency's outage must not restart every pod).
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");

    // Draining: the preStop pause, then SHUTDOWN_TIMEOUT for in-flight requests, both within
    // the grace period, with room left for closing the pools.
    let command = container["lifecycle"]["preStop"]["exec"]["command"].as_array().unwrap();
    assert_eq!(command[0], "sleep");
    let pause: f64 = command[1].as_str().unwrap().parse().unwrap();
    let shutdown = seconds(config["SHUTDOWN_TIMEOUT"].as_str().expect("SHUTDOWN_TIMEOUT in the ConfigMap"));
    let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
    assert!(
        grace >= pause + shutdown + 5.0,
        "grace {grace} s < preStop {pause} s + SHUTDOWN_TIMEOUT {shutdown} s + 5"
    );

    // Rolling updates never take capacity away; three replicas, and the autoscaler's floor.
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(one(&objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"], 3);

    // Hardening.
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let user = pod["securityContext"]["runAsUser"].as_u64().expect("runAsUser");
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("\nUSER {user}:")), "runAsUser {user} is the image's user");
    for request in ["cpu", "memory"] {
        assert!(container["resources"]["requests"][request].is_string(), "a {request} request");
    }
    assert!(container["resources"]["limits"]["memory"].is_string(), "a memory limit");
}
