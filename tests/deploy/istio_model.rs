//! A MODEL of Istio's authorization rules in ambient mode, evaluated over rendered manifests.
//!
//! It is not Istio. It encodes the documented semantics the chart relies on:
//! - AuthorizationPolicy evaluation: CUSTOM is unsupported here; any matching DENY denies; with no
//!   ALLOW policy on the target everything is allowed; otherwise a request must match a rule of
//!   some ALLOW policy. A rule matches when any of its `from` sources and any of its `to`
//!   operations match (absent = anything); inside a source/operation every field must match.
//!   Strings match exactly, by `prefix*`, `*suffix` or `*`.
//! - Ambient enforcement points: ztunnel enforces `selector` (and namespace-wide) policies on the
//!   destination pod with L4 attributes only; an ALLOW rule that needs L7 attributes (methods,
//!   paths) never matches there, a DENY rule with them matches regardless. A Service labelled
//!   `istio.io/use-waypoint: W` is reached through waypoint W (a Gateway of class
//!   istio-waypoint), which enforces the `targetRefs` policies of that Service at L7 and then
//!   connects to the pod as W's own service account (`.../sa/W`).
//! - PeerAuthentication STRICT on a pod refuses plaintext (identity-less) connections.
//!
//! Any field the model does not know makes it panic, so a chart change that needs more semantics
//! fails the test instead of being silently misread.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_norway::Value;

const TRUST_DOMAIN: &str = "cluster.local";

/// A request as a source sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// SPIFFE-style principal `cluster.local/ns/N/sa/S`; None for a plaintext client outside the mesh.
    pub principal: Option<String>,
    pub method: String,
    pub path: String,
}

impl Request {
    pub fn from_sa(ns: &str, sa: &str, method: &str, path: &str) -> Request {
        Request {
            principal: Some(principal(ns, sa)),
            method: method.into(),
            path: path.into(),
        }
    }
    pub fn plaintext(method: &str, path: &str) -> Request {
        Request {
            principal: None,
            method: method.into(),
            path: path.into(),
        }
    }
    fn namespace(&self) -> Option<&str> {
        let p = self.principal.as_deref()?;
        p.split('/').skip_while(|s| *s != "ns").nth(1)
    }
}

pub fn principal(ns: &str, sa: &str) -> String {
    format!("{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, with the enforcement point and reason.
    Deny(String),
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        *self == Verdict::Allow
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
enum Target {
    /// Pods in `namespace` whose labels include these (empty = every pod of the namespace).
    Selector(BTreeMap<String, String>),
    /// Services (by name) in the policy's namespace, enforced by their waypoint.
    Services(Vec<String>),
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    ports: Option<Vec<String>>,
    not_ports: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

impl Operation {
    fn needs_l7(&self) -> bool {
        self.methods.is_some() || self.not_methods.is_some() || self.paths.is_some() || self.not_paths.is_some()
    }
}

#[derive(Debug, Clone)]
struct Rule {
    from: Option<Vec<Source>>,
    to: Option<Vec<Operation>>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    namespace: String,
    target: Target,
    action: Action,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Workload {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    service_account: String,
    /// container port name -> number
    ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone)]
struct Service {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    /// service port -> target port (number or name)
    ports: Vec<(u16, Value)>,
}

/// Where a request goes: a Service (through its waypoint, if any) or a pod of a workload directly.
#[derive(Debug, Clone)]
pub enum Dest<'a> {
    Service(&'a str, u16),
    /// The pods of the workload with this `app.kubernetes.io/component`, at a container port.
    Pod(&'a str, u16),
}

/// The rendered cluster: what the model needs from `helm template` output.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    pub policies: Vec<Policy>,
    workloads: Vec<Workload>,
    services: Vec<Service>,
    /// Waypoint Gateways: (namespace, name).
    waypoints: Vec<(String, String)>,
    /// Pod selectors under PeerAuthentication STRICT: (namespace, matchLabels).
    strict: Vec<(String, BTreeMap<String, String>)>,
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("model: expected a scalar, got {other:?}"),
    }
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    Some(cur)
}

fn str_at(v: &Value, path: &[&str]) -> Option<String> {
    get(v, path).filter(|v| !v.is_null()).map(s)
}

fn labels(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Mapping(m)) = v {
        for (k, val) in m {
            out.insert(s(k), s(val));
        }
    }
    out
}

fn string_list(v: &Value, what: &str) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().map(s).collect(),
        other => panic!("model: {what} must be a list, got {other:?}"),
    }
}

/// Fails on a key the model does not implement.
fn known_keys(v: &Value, allowed: &[&str], what: &str) {
    if let Value::Mapping(m) = v {
        for k in m.keys() {
            let k = s(k);
            assert!(
                allowed.contains(&k.as_str()),
                "model of Istio's rules: {what} has field {k:?} which the model does not implement; extend tests/deploy/istio_model.rs"
            );
        }
    } else {
        panic!("model: {what} must be a mapping, got {v:?}");
    }
}

fn parse_source(v: &Value) -> Source {
    known_keys(
        v,
        &["principals", "notPrincipals", "namespaces", "notNamespaces"],
        "source",
    );
    let l = |k: &str| v.get(k).map(|x| string_list(x, k));
    Source {
        principals: l("principals"),
        not_principals: l("notPrincipals"),
        namespaces: l("namespaces"),
        not_namespaces: l("notNamespaces"),
    }
}

fn parse_operation(v: &Value) -> Operation {
    known_keys(
        v,
        &["ports", "notPorts", "methods", "notMethods", "paths", "notPaths"],
        "operation",
    );
    let l = |k: &str| v.get(k).map(|x| string_list(x, k));
    Operation {
        ports: l("ports"),
        not_ports: l("notPorts"),
        methods: l("methods"),
        not_methods: l("notMethods"),
        paths: l("paths"),
        not_paths: l("notPaths"),
    }
}

fn parse_rule(v: &Value) -> Rule {
    known_keys(v, &["from", "to"], "rule");
    let from = v.get("from").map(|f| {
        match f {
            Value::Sequence(items) => items,
            other => panic!("model: from must be a list, got {other:?}"),
        }
        .iter()
        .map(|item| {
            known_keys(item, &["source"], "from[]");
            parse_source(item.get("source").expect("from[] without source"))
        })
        .collect()
    });
    let to = v.get("to").map(|t| {
        match t {
            Value::Sequence(items) => items,
            other => panic!("model: to must be a list, got {other:?}"),
        }
        .iter()
        .map(|item| {
            known_keys(item, &["operation"], "to[]");
            parse_operation(item.get("operation").expect("to[] without operation"))
        })
        .collect()
    });
    Rule { from, to }
}

/// Parses one AuthorizationPolicy document.
pub fn parse_policy(doc: &Value) -> Policy {
    let name = str_at(doc, &["metadata", "name"]).expect("policy without a name");
    let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
    let spec = doc.get("spec").cloned().unwrap_or(Value::Null);
    if spec.is_null() {
        // `spec: {}` is Istio's allow-nothing policy on the whole namespace.
        return Policy {
            name,
            namespace,
            target: Target::Selector(BTreeMap::new()),
            action: Action::Allow,
            rules: vec![],
        };
    }
    known_keys(
        &spec,
        &["selector", "targetRefs", "action", "rules"],
        "AuthorizationPolicy spec",
    );
    let action = match str_at(&spec, &["action"]).as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other) => panic!("model of Istio's rules: action {other} is not modelled"),
    };
    let target = match (spec.get("selector"), spec.get("targetRefs")) {
        (Some(_), Some(_)) => panic!("{name}: selector and targetRefs together are invalid in Istio"),
        (Some(sel), None) => {
            known_keys(sel, &["matchLabels"], "selector");
            Target::Selector(labels(sel.get("matchLabels")))
        }
        (None, Some(refs)) => Target::Services(
            match refs {
                Value::Sequence(items) => items,
                other => panic!("targetRefs must be a list, got {other:?}"),
            }
            .iter()
            .map(|r| {
                known_keys(r, &["kind", "group", "name", "namespace"], "targetRef");
                assert_eq!(
                    str_at(r, &["kind"]).as_deref(),
                    Some("Service"),
                    "model: only Service targetRefs are modelled"
                );
                assert_eq!(
                    str_at(r, &["group"]).unwrap_or_default(),
                    "",
                    "model: a Service targetRef has the core group \"\""
                );
                str_at(r, &["name"]).expect("targetRef without name")
            })
            .collect(),
        ),
        (None, None) => Target::Selector(BTreeMap::new()),
    };
    let rules = match spec.get("rules") {
        None | Some(Value::Null) => vec![],
        Some(Value::Sequence(items)) => items.iter().map(parse_rule).collect(),
        Some(other) => panic!("rules must be a list, got {other:?}"),
    };
    Policy {
        name,
        namespace,
        target,
        action,
        rules,
    }
}

impl Mesh {
    /// Builds the model from every document of a `helm template` output.
    pub fn from_docs(docs: &[Value]) -> Mesh {
        let mut mesh = Mesh::default();
        for doc in docs {
            let kind = str_at(doc, &["kind"]).unwrap_or_default();
            let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
            let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
            match kind.as_str() {
                "AuthorizationPolicy" => mesh.policies.push(parse_policy(doc)),
                "Deployment" | "StatefulSet" => {
                    let pod = get(doc, &["spec", "template"]).expect("workload without a pod template");
                    let mut ports = BTreeMap::new();
                    if let Some(Value::Sequence(cs)) = get(pod, &["spec", "containers"]) {
                        for c in cs {
                            if let Some(Value::Sequence(ps)) = c.get("ports") {
                                for p in ps {
                                    let n: u16 = s(p.get("containerPort").unwrap()).parse().unwrap();
                                    if let Some(pn) = str_at(p, &["name"]) {
                                        ports.insert(pn, n);
                                    }
                                }
                            }
                        }
                    }
                    mesh.workloads.push(Workload {
                        name,
                        namespace,
                        labels: labels(get(pod, &["metadata", "labels"])),
                        service_account: str_at(pod, &["spec", "serviceAccountName"])
                            .unwrap_or_else(|| "default".into()),
                        ports,
                    });
                }
                "Service" => {
                    let mut ports = vec![];
                    if let Some(Value::Sequence(ps)) = get(doc, &["spec", "ports"]) {
                        for p in ps {
                            let port: u16 = s(p.get("port").unwrap()).parse().unwrap();
                            let target = p.get("targetPort").cloned().unwrap_or(Value::from(port));
                            ports.push((port, target));
                        }
                    }
                    mesh.services.push(Service {
                        name,
                        namespace,
                        labels: labels(get(doc, &["metadata", "labels"])),
                        selector: labels(get(doc, &["spec", "selector"])),
                        ports,
                    });
                }
                "Gateway" if str_at(doc, &["spec", "gatewayClassName"]).as_deref() == Some("istio-waypoint") => {
                    mesh.waypoints.push((namespace, name));
                }
                "PeerAuthentication" => {
                    let mode = str_at(doc, &["spec", "mtls", "mode"]);
                    if mode.as_deref() == Some("STRICT") {
                        mesh.strict
                            .push((namespace, labels(get(doc, &["spec", "selector", "matchLabels"]))));
                    }
                }
                _ => {}
            }
        }
        mesh
    }

    /// The service account principal of our workload with this `app.kubernetes.io/component`.
    pub fn principal_of(&self, component: &str) -> String {
        let w = self.workload(component);
        principal(&w.namespace, &w.service_account)
    }

    pub fn namespace_of(&self, component: &str) -> String {
        self.workload(component).namespace.clone()
    }

    fn workload(&self, component: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.labels.get("app.kubernetes.io/component").map(String::as_str) == Some(component))
            .unwrap_or_else(|| panic!("no rendered workload with component {component}"))
    }

    pub fn has_workload(&self, component: &str) -> bool {
        self.workloads
            .iter()
            .any(|w| w.labels.get("app.kubernetes.io/component").map(String::as_str) == Some(component))
    }

    pub fn policy_mut(&mut self, name: &str) -> &mut Policy {
        self.policies
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no policy {name}"))
    }

    /// Evaluates `req` sent to `dest`.
    pub fn evaluate(&self, req: &Request, dest: Dest) -> Verdict {
        match dest {
            Dest::Pod(component, port) => self.ztunnel(req, self.workload(component), port),
            Dest::Service(name, port) => {
                let svc = self
                    .services
                    .iter()
                    .find(|s| s.name == name)
                    .unwrap_or_else(|| panic!("no rendered Service {name}"));
                let target = &svc
                    .ports
                    .iter()
                    .find(|(p, _)| *p == port)
                    .unwrap_or_else(|| panic!("Service {name} has no port {port}"))
                    .1;
                let pods: Vec<&Workload> = self
                    .workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == svc.namespace
                            && !svc.selector.is_empty()
                            && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .collect();
                assert!(!pods.is_empty(), "Service {name} selects no rendered workload");
                let mut verdict = Verdict::Allow;
                for pod in pods {
                    let pod_port = match target {
                        Value::Number(n) => n.as_u64().unwrap() as u16,
                        Value::String(named) => *pod
                            .ports
                            .get(named)
                            .unwrap_or_else(|| panic!("{}: no container port named {named}", pod.name)),
                        other => panic!("bad targetPort {other:?}"),
                    };
                    let v = match svc.labels.get("istio.io/use-waypoint") {
                        Some(wp) => {
                            assert!(
                                self.waypoints.contains(&(svc.namespace.clone(), wp.clone())),
                                "Service {name} uses waypoint {wp}, which is not rendered"
                            );
                            let l7 = self.decide(
                                self.policies.iter().filter(|p| {
                                    p.namespace == svc.namespace
                                        && matches!(&p.target, Target::Services(names) if names.contains(&svc.name))
                                }),
                                req,
                                port,
                                true,
                                &format!("waypoint {wp}"),
                            );
                            if l7 != Verdict::Allow {
                                return l7;
                            }
                            // The waypoint opens its own HBONE connection to the pod.
                            let hop = Request {
                                principal: Some(principal(&svc.namespace, wp)),
                                ..req.clone()
                            };
                            self.ztunnel(&hop, pod, pod_port)
                        }
                        None => self.ztunnel(req, pod, pod_port),
                    };
                    if v != Verdict::Allow {
                        verdict = v;
                    }
                }
                verdict
            }
        }
    }

    fn ztunnel(&self, req: &Request, pod: &Workload, port: u16) -> Verdict {
        let strict = self
            .strict
            .iter()
            .any(|(ns, sel)| *ns == pod.namespace && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)));
        if strict && req.principal.is_none() {
            return Verdict::Deny(format!(
                "ztunnel on {}: PeerAuthentication STRICT refuses plaintext",
                pod.name
            ));
        }
        self.decide(
            self.policies.iter().filter(|p| {
                p.namespace == pod.namespace
                    && matches!(&p.target, Target::Selector(sel) if sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
            }),
            req,
            port,
            false,
            &format!("ztunnel on {}", pod.name),
        )
    }

    fn decide<'a>(
        &self,
        policies: impl Iterator<Item = &'a Policy>,
        req: &Request,
        port: u16,
        l7: bool,
        at: &str,
    ) -> Verdict {
        let policies: Vec<&Policy> = policies.collect();
        for p in policies.iter().filter(|p| p.action == Action::Deny) {
            if p.rules.iter().any(|r| rule_matches(r, req, port, l7, Action::Deny)) {
                return Verdict::Deny(format!("{at}: DENY policy {}", p.name));
            }
        }
        let allows: Vec<&&Policy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
        if allows.is_empty() {
            return Verdict::Allow;
        }
        if allows
            .iter()
            .any(|p| p.rules.iter().any(|r| rule_matches(r, req, port, l7, Action::Allow)))
        {
            Verdict::Allow
        } else {
            let names: Vec<&str> = allows.iter().map(|p| p.name.as_str()).collect();
            Verdict::Deny(format!("{at}: no rule of ALLOW policies {names:?} matches"))
        }
    }
}

/// Istio string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn any_match(patterns: &[String], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| string_match(p, v)))
}

fn source_matches(src: &Source, req: &Request) -> bool {
    let p = req.principal.as_deref();
    let ns = req.namespace();
    src.principals.as_ref().is_none_or(|l| any_match(l, p))
        && src.not_principals.as_ref().is_none_or(|l| !any_match(l, p))
        && src.namespaces.as_ref().is_none_or(|l| any_match(l, ns))
        && src.not_namespaces.as_ref().is_none_or(|l| !any_match(l, ns))
}

fn operation_matches(op: &Operation, req: &Request, port: u16, l7: bool, action: Action) -> bool {
    if !l7 && op.needs_l7() {
        // ztunnel cannot see HTTP: an ALLOW rule needing it never matches, a DENY rule always does.
        return action == Action::Deny;
    }
    let port = port.to_string();
    op.ports.as_ref().is_none_or(|l| any_match(l, Some(&port)))
        && op.not_ports.as_ref().is_none_or(|l| !any_match(l, Some(&port)))
        && op.methods.as_ref().is_none_or(|l| any_match(l, Some(&req.method)))
        && op.not_methods.as_ref().is_none_or(|l| !any_match(l, Some(&req.method)))
        && op.paths.as_ref().is_none_or(|l| any_match(l, Some(&req.path)))
        && op.not_paths.as_ref().is_none_or(|l| !any_match(l, Some(&req.path)))
}

fn rule_matches(rule: &Rule, req: &Request, port: u16, l7: bool, action: Action) -> bool {
    rule.from
        .as_ref()
        .is_none_or(|f| f.is_empty() || f.iter().any(|s| source_matches(s, req)))
        && rule
            .to
            .as_ref()
            .is_none_or(|t| t.is_empty() || t.iter().any(|o| operation_matches(o, req, port, l7, action)))
}

impl Policy {
    /// Test helper for mutation checks: removes the `from` of rule `i` (anyone may then match it).
    pub fn drop_from_of_rule(&mut self, i: usize) {
        self.rules[i].from = None;
    }
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    /// A namespace `ns` with one workload `app` (SA `app`) behind Service `app` port 80 -> 8080,
    /// plus the given policy documents.
    fn mesh(waypoint: bool, policies: &str) -> Mesh {
        let mut text = String::from(
            "kind: Deployment\nmetadata: {name: app, namespace: ns}\nspec:\n  template:\n    metadata: {labels: {app: app}}\n    spec:\n      serviceAccountName: app\n      containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]\n---\nkind: Service\nmetadata: {name: app, namespace: ns, labels: {",
        );
        if waypoint {
            text.push_str("istio.io/use-waypoint: wp");
        }
        text.push_str("}}\nspec: {selector: {app: app}, ports: [{port: 80, targetPort: http}]}\n---\nkind: Gateway\nmetadata: {name: wp, namespace: ns}\nspec: {gatewayClassName: istio-waypoint}\n---\n");
        text.push_str(policies);
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect();
        Mesh::from_docs(&docs)
    }

    fn get(path: &str) -> Request {
        Request::from_sa("other", "client", "GET", path)
    }

    #[test]
    fn no_policy_allows_and_an_empty_allow_policy_denies() {
        assert!(mesh(false, "").evaluate(&get("/"), Dest::Service("app", 80)).allowed());
        let m = mesh(
            false,
            "kind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {selector: {matchLabels: {app: app}}, action: ALLOW, rules: []}\n",
        );
        assert!(!m.evaluate(&get("/"), Dest::Service("app", 80)).allowed());
    }

    #[test]
    fn deny_wins_over_allow() {
        let m = mesh(
            false,
            "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: ns}\nspec: {selector: {matchLabels: {app: app}}, rules: [{}]}\n---\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: ns}\nspec: {selector: {matchLabels: {app: app}}, action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}\n",
        );
        assert!(!m.evaluate(&get("/"), Dest::Service("app", 80)).allowed());
        let mine = Request::from_sa("ns", "x", "GET", "/");
        assert!(m.evaluate(&mine, Dest::Service("app", 80)).allowed());
    }

    #[test]
    fn ztunnel_cannot_match_l7_allow_rules_but_the_waypoint_can() {
        let policy = |target: &str| {
            format!(
                "kind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec: {{{target}, rules: [{{to: [{{operation: {{paths: [/ok]}}}}]}}]}}\n"
            )
        };
        // At ztunnel (selector policy, no waypoint) a path rule never matches.
        let m = mesh(false, &policy("selector: {matchLabels: {app: app}}"));
        assert!(!m.evaluate(&get("/ok"), Dest::Service("app", 80)).allowed());
        // At the waypoint (targetRefs) it does, and ztunnel then sees the waypoint's identity.
        let m = mesh(true, &policy("targetRefs: [{kind: Service, group: '', name: app}]"));
        assert!(m.evaluate(&get("/ok"), Dest::Service("app", 80)).allowed());
        assert!(!m.evaluate(&get("/nope"), Dest::Service("app", 80)).allowed());
    }

    #[test]
    #[should_panic(expected = "does not implement")]
    fn unknown_fields_are_refused() {
        mesh(
            false,
            "kind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {selector: {matchLabels: {app: app}}, rules: [{when: [{key: k, values: [v]}]}]}\n",
        );
    }

    #[test]
    fn istio_string_matching() {
        assert!(string_match("/v1/traces", "/v1/traces"));
        assert!(!string_match("/v1/traces", "/v1/traces/x"));
        assert!(string_match("/v1/traces/*", "/v1/traces/x"));
        assert!(string_match("*/sa/agent", "cluster.local/ns/a/sa/agent"));
        assert!(string_match("*", "x"));
        assert!(!string_match("*", ""));
    }
}
