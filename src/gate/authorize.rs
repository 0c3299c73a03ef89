//! The authorization step of an authenticated request: canonical query and body, the route table's
//! rule, every target resolved to its experiment (cached, concurrent, capped), one decision, and the
//! canonical request forwarded. Anything the gate cannot place is refused.
use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use super::authz::{Decision, Experiment, Level};
use super::canonical::{self, CanonError, CanonPath};
use super::routes::{self, BodyKind, Find, Kind, Rule};
use super::session::Identity;
use super::targets::{self, Found};
use super::{Body, Gate, MAX_INSPECTED_BODY, detail, full, query_value, read_limited};
use crate::otlp::{EXPERIMENT_HEADER, ExperimentId};

/// MLflow's workspace selector (a workspaces-enabled server): not passed on for non-admins.
const WORKSPACE_HEADER: &str = "x-mlflow-workspace";
/// Paging of searches (snake and camelCase), replaced for callers whose answers are cut.
const SEARCH_PAGING: [&str; 4] = ["max_results", "maxResults", "page_token", "pageToken"];
/// MLflow's largest page (SEARCH_MAX_RESULTS_THRESHOLD).
const SEARCH_MAX_RESULTS: u64 = 50_000;
/// OTLP ingestion links the traces to this run.
const RUN_ID_HEADER: &str = "x-mlflow-run-id";

/// Largest OTLP body a non-admin's export may have (the gate reads it to find its traces).
const MAX_OTLP_BODY: usize = 32 << 20;

/// Most resolved owners kept (run and logged-model ids never change experiment).
const MAX_OWNERS: usize = 100_000;

impl Gate {
    pub(super) async fn authorize(
        &self,
        req: Request<Body>,
        canon: &CanonPath,
        identity: Identity,
        peer: SocketAddr,
    ) -> Response<Body> {
        let groups = &identity.groups;
        let query = match canonical::query(req.uri().query()) {
            Ok(q) => q,
            Err(e) => return self.bad_request(&e),
        };
        let method = req.method().clone();
        let route = routes::lookup(method.as_str(), &canon.segments, canon.trailing_slash);
        let encoded_query = query.encoded();
        let pq = if encoded_query.is_empty() {
            canon.encoded()
        } else {
            format!("{}?{encoded_query}", canon.encoded())
        };
        let (mut parts, body) = req.into_parts();
        match pq.parse() {
            Ok(u) => parts.uri = u,
            Err(_) => return detail(StatusCode::BAD_REQUEST, "Invalid request target"),
        }
        if self.policy.is_admin(groups) {
            return self
                .forward(Request::from_parts(parts, body), Some(&identity), peer)
                .await;
        }
        if !self.policy.is_member(groups) {
            return self.forbidden(&identity, &method, canon, Decision::NotMember);
        }
        let rule = route.map(|r| r.rule).unwrap_or(Rule::Admin);
        let body_kind = route.map(|r| r.body).unwrap_or(BodyKind::Json);
        let body_method = !matches!(method, Method::GET | Method::HEAD);
        // Workspaces would give experiment ids another namespace the permissions file knows nothing of.
        parts.headers.remove(WORKSPACE_HEADER);
        if parts.headers.get_all(EXPERIMENT_HEADER).iter().count() > 1 {
            return self.bad_request(&CanonError::Query(format!("{EXPERIMENT_HEADER} given more than once")));
        }

        // MLflow reads a GET's JSON body when it has no query: GETs and HEADs go on without one.
        // Other JSON bodies are read whole and forwarded in their canonical form.
        let mut json = None;
        // OTLP spans of a trace that exists join it in its experiment: a writer's OTLP body is read
        // (bounded) to find its traces.
        let inspect_otlp = matches!(rule, Rule::Experiments(_, finds) if finds.contains(&Find::OtlpTraces))
            && self.policy.needs_experiments(groups);
        let mut otlp_traces = Vec::new();
        let mut body = if inspect_otlp {
            let Some(bytes) = read_limited(body, MAX_OTLP_BODY).await else {
                return detail(StatusCode::PAYLOAD_TOO_LARGE, "OTLP request body too large");
            };
            let value = |h| parts.headers.get(h).and_then(|v| v.to_str().ok());
            let read = match targets::otlp_trace_ids(
                value(header::CONTENT_TYPE),
                value(header::CONTENT_ENCODING),
                &bytes,
                MAX_OTLP_BODY,
            ) {
                Ok(read) => read,
                Err(e) => return self.bad_request(&e),
            };
            otlp_traces = read.trace_ids;
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::TRANSFER_ENCODING);
            // MLflow gets exactly the bytes the gate read, never a second reading of them.
            match read.decompressed {
                Some(plain) => {
                    parts.headers.remove(header::CONTENT_ENCODING);
                    full(plain)
                }
                None => full(bytes),
            }
        } else if !body_method {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::TRANSFER_ENCODING);
            full(Bytes::new())
        } else if body_kind == BodyKind::Opaque {
            body
        } else {
            let Some(bytes) = read_limited(body, MAX_INSPECTED_BODY).await else {
                return detail(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large for an MLflow API call",
                );
            };
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::TRANSFER_ENCODING);
            // What is forwarded is the canonical JSON itself, never an encoding of it.
            parts.headers.remove(header::CONTENT_ENCODING);
            match canonical::json_body(&bytes) {
                Ok(Some(m)) => {
                    let out = serde_json::to_vec(&m).unwrap_or_default();
                    json = Some(m);
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    full(out)
                }
                Ok(None) => full(Bytes::new()),
                Err(e) => return self.bad_request(&e),
            }
        };

        let mut filter_answer = false;
        let decision = match rule {
            Rule::Admin => Decision::AdminOnly(format!(
                "{method} {}",
                canon.decoded().chars().take(100).collect::<String>()
            )),
            Rule::Member => Decision::Allow,
            Rule::ExperimentListing => {
                filter_answer = self.policy.needs_experiments(groups);
                self.policy.decide(groups, Level::Read, &[])
            }
            Rule::Registry(level) => self.policy.decide_all(groups, level, &[], true),
            Rule::Experiments(_, _) if targets::sets_reserved_trace_tag(&canon.segments, json.as_ref()) => {
                Decision::AdminOnly("setting the trace tag mlflow.artifactLocation".into())
            }
            Rule::Experiments(level, finds) => {
                let inputs = targets::Inputs {
                    segments: &canon.segments,
                    query: &query,
                    body: json.as_ref(),
                    // Uploads name their run in the query, as do GETs.
                    body_method: body_method && body_kind == BodyKind::Json,
                    experiment_header: parts.headers.get(EXPERIMENT_HEADER).and_then(|v| v.to_str().ok()),
                };
                let mut found = match targets::find(finds, &inputs) {
                    Ok(f) => f,
                    Err(e) => return self.bad_request(&e),
                };
                // OTLP ingestion links the traces to the run this header names: a write to the
                // run's experiment, which must be allowed like the traces' own.
                if finds.contains(&Find::OtlpTraces) {
                    let named: Vec<&HeaderValue> = parts.headers.get_all(RUN_ID_HEADER).iter().collect();
                    match named.as_slice() {
                        [] => {}
                        [one] => match one.to_str().map(str::trim) {
                            Ok(run) if !run.is_empty() => found.runs.push(run.to_string()),
                            _ => {
                                return self
                                    .bad_request(&CanonError::Query(format!("{RUN_ID_HEADER} is not a run id")));
                            }
                        },
                        _ => {
                            return self
                                .bad_request(&CanonError::Query(format!("{RUN_ID_HEADER} given more than once")));
                        }
                    }
                }
                otlp_traces.append(&mut found.traces_if_exist);
                let existing = if self.policy.needs_experiments(groups) {
                    self.existing_trace_experiments(&otlp_traces).await
                } else {
                    Some(Vec::new())
                };
                match existing {
                    Some(owners) => found.experiments.extend(owners),
                    None => {
                        return self.forbidden(
                            &identity,
                            &method,
                            canon,
                            Decision::Missing {
                                need: level,
                                experiment: Some("of the traces (look-up failed)".into()),
                            },
                        );
                    }
                }
                found.experiments.sort();
                found.experiments.dedup();
                self.decide_found(groups, level, found).await
            }
            Rule::Graphql => {
                if !query.0.is_empty() {
                    // graphene would let query parameters override the body.
                    return self.bad_request(&CanonError::Query("GraphQL takes no query parameters".into()));
                }
                let empty = serde_json::Map::new();
                let needs = match super::graphql::needs(json.as_ref().unwrap_or(&empty)) {
                    Ok(n) => n,
                    Err(e) => return self.bad_request(&e),
                };
                if let Some(f) = needs.admin.first() {
                    Decision::AdminOnly(format!("GraphQL field {f}"))
                } else {
                    let registry = if needs.registry {
                        self.policy.decide_all(groups, Level::Read, &[], true)
                    } else {
                        Decision::Allow
                    };
                    if registry != Decision::Allow {
                        registry
                    } else if needs.found.is_empty() && !needs.found.everywhere {
                        Decision::Allow
                    } else {
                        self.decide_found(groups, Level::Read, needs.found).await
                    }
                }
            }
        };
        if decision != Decision::Allow {
            return self.forbidden(&identity, &method, canon, decision);
        }
        if filter_answer {
            parts.headers.remove(header::ACCEPT_ENCODING);
            if canon.segments.last().is_some_and(|s| s == "search") {
                // Cut answers must not tell whether hidden experiments matched: one page holding
                // every match (MLflow's own maximum), no page tokens either way.
                let pairs = |q: &canonical::Query| -> Vec<(String, String)> {
                    q.0.iter()
                        .filter(|(k, _)| !SEARCH_PAGING.contains(&k.as_str()))
                        .cloned()
                        .chain([("max_results".to_string(), SEARCH_MAX_RESULTS.to_string())])
                        .collect()
                };
                if body_method {
                    let mut m = json.take().unwrap_or_default();
                    m.retain(|k, _| !SEARCH_PAGING.contains(&k.as_str()));
                    m.insert("max_results".into(), SEARCH_MAX_RESULTS.into());
                    parts.headers.remove(header::CONTENT_LENGTH);
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    body = full(serde_json::to_vec(&m).unwrap_or_default());
                } else {
                    let q = canonical::Query(pairs(&query)).encoded();
                    match format!("{}?{q}", canon.encoded()).parse() {
                        Ok(u) => parts.uri = u,
                        Err(_) => return detail(StatusCode::BAD_REQUEST, "Invalid request target"),
                    }
                }
            }
        }
        let resp = self
            .forward(Request::from_parts(parts, body), Some(&identity), peer)
            .await;
        if filter_answer {
            return self.readable_part(resp, groups).await;
        }
        resp
    }

    fn bad_request(&self, e: &CanonError) -> Response<Body> {
        self.metrics.auth_failure("bad_request");
        detail(StatusCode::BAD_REQUEST, &e.to_string())
    }

    fn forbidden(&self, identity: &Identity, method: &Method, canon: &CanonPath, d: Decision) -> Response<Body> {
        self.metrics.auth_failure(match d {
            Decision::NotMember => "not_member",
            _ => "permission",
        });
        tracing::info!(user = %identity.user, method = %method, path = %canon.decoded(), "forbidden: {}", d.detail());
        detail(StatusCode::FORBIDDEN, &d.detail())
    }

    /// `level` on every experiment `found` names or reaches. Nothing named: `level` everywhere.
    async fn decide_found(&self, groups: &[String], level: Level, found: Found) -> Decision {
        let everywhere = found.everywhere || found.is_empty();
        if !self.policy.needs_experiments(groups) {
            return self.policy.decide_all(groups, level, &[], everywhere);
        }
        let mut ids = found.experiments.clone();
        let lookups = found
            .runs
            .iter()
            .map(|r| (Kind::Run, r))
            .chain(found.traces.iter().map(|t| (Kind::Trace, t)))
            .chain(found.models.iter().map(|m| (Kind::LoggedModel, m)));
        let lookups: Vec<(Kind, &String)> = lookups.collect();
        let owners = join_all(lookups.iter().map(|(k, id)| self.owner(*k, id))).await;
        for ((kind, id), owner) in lookups.iter().zip(owners) {
            match owner {
                Some(e) => ids.push(e),
                None => {
                    let what = match kind {
                        Kind::Run => "run",
                        Kind::Trace => "trace",
                        _ => "logged model",
                    };
                    return Decision::Missing {
                        need: level,
                        experiment: Some(format!(
                            "of {what} {} (not found)",
                            id.chars().take(64).collect::<String>()
                        )),
                    };
                }
            }
        }
        ids.sort();
        ids.dedup();
        let names: Vec<Option<String>> = if self.policy.needs_names() {
            join_all(ids.iter().map(|id| self.experiment_name(id))).await
        } else {
            vec![None; ids.len()]
        };
        let mut experiments: Vec<Experiment> = ids
            .into_iter()
            .zip(names)
            .map(|(id, name)| Experiment { id, name })
            .collect();
        // A created experiment has no id yet: only name rules (and "*") can match its name. A
        // rename matters only where rules match names (it could move an experiment under a more
        // generous glob); with id rules alone, EDIT on the experiment is what it takes.
        let renames = !experiments.is_empty();
        let new_names = if renames && !self.policy.needs_names() {
            Vec::new()
        } else {
            found.new_names
        };
        experiments.extend(new_names.into_iter().map(|n| Experiment {
            id: format!("new:{n}"),
            name: Some(n),
        }));
        self.policy.decide_all(groups, level, &experiments, everywhere)
    }

    /// The experiments of those of `traces` that exist already (one MLflow call per 100 ids);
    /// None when MLflow could not say.
    async fn existing_trace_experiments(&self, traces: &[String]) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for chunk in traces.chunks(100) {
            let body = serde_json::json!({ "trace_ids": chunk }).to_string();
            let uri = format!(
                "{}://{}/api/3.0/mlflow/traces/batchGetInfos",
                self.upstream_scheme, self.upstream_authority
            );
            let req = http::Request::post(uri)
                .header(header::HOST, &self.upstream_authority)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.into_bytes())
                .ok()?;
            let resp = self.http.exchange(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let v: serde_json::Value = serde_json::from_slice(resp.body()).ok()?;
            // Protobuf JSON leaves an empty list out: `{}` is "none of them exists".
            let infos = match v.get("trace_infos") {
                None => &[][..],
                Some(x) => x.as_array()?.as_slice(),
            };
            for info in infos {
                // A trace stored anywhere but an experiment: nothing the permissions file covers.
                let e = info
                    .pointer("/trace_location/mlflow_experiment/experiment_id")?
                    .as_str()?;
                if !ExperimentId::is_canonical(e) {
                    return None;
                }
                out.push(e.to_string());
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// The experiment a run, trace or logged model belongs to, from MLflow. Runs and logged models
    /// never change experiment and are cached; a trace moves when a start-trace call names it
    /// again with another experiment, so traces are asked every time.
    async fn owner(&self, kind: Kind, id: &str) -> Option<String> {
        let key = (kind_tag(kind), id.to_string());
        let cacheable = matches!(kind, Kind::Run | Kind::LoggedModel);
        if cacheable && let Some(e) = self.owners.lock().await.get(&key) {
            return Some(e.clone());
        }
        let (path, pointer) = match kind {
            Kind::Run => (
                format!("/api/2.0/mlflow/runs/get?run_id={}", query_value(id)),
                "/run/info/experiment_id",
            ),
            Kind::Trace => (
                format!("/api/3.0/mlflow/traces/{}", canonical::encode_segment(id)),
                "/trace/trace_info/trace_location/mlflow_experiment/experiment_id",
            ),
            Kind::LoggedModel => (
                format!("/api/2.0/mlflow/logged-models/{}", canonical::encode_segment(id)),
                "/model/info/experiment_id",
            ),
            _ => return None,
        };
        let v = self.upstream_json(&path).await?;
        let e = v.pointer(pointer)?.as_str()?.to_string();
        if !ExperimentId::is_canonical(&e) {
            return None;
        }
        if cacheable {
            let mut owners = self.owners.lock().await;
            if owners.len() >= MAX_OWNERS {
                owners.clear();
            }
            owners.insert(key, e.clone());
        }
        Some(e)
    }
}

fn kind_tag(k: Kind) -> u8 {
    match k {
        Kind::Run => 1,
        Kind::Trace => 2,
        Kind::LoggedModel => 3,
        _ => 0,
    }
}

/// Run / trace / logged-model id → experiment id.
pub(super) type Owners = HashMap<(u8, String), String>;
