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

/// A canonical JSON body, as MLflow gets it.
type JsonBody = serde_json::Map<String, serde_json::Value>;

/// What authorization knows of a request once its route is looked up.
struct Ask<'a> {
    groups: &'a [String],
    canon: &'a CanonPath,
    query: &'a canonical::Query,
    method: &'a Method,
    rule: Rule,
    body_kind: BodyKind,
    /// Not a GET or HEAD: a body may be read.
    body_method: bool,
}

/// The body to forward, its canonical JSON, and the traces an OTLP export carries.
struct ReadBody {
    body: Body,
    json: Option<JsonBody>,
    otlp_traces: Vec<String>,
}

impl Gate {
    pub(super) async fn authorize(
        &self,
        req: Request<Body>,
        canon: &CanonPath,
        identity: Identity,
        peer: SocketAddr,
    ) -> Response<Body> {
        match self.authorized(req, canon, &identity, peer).await {
            Ok(resp) | Err(resp) => resp,
        }
    }

    /// Ok: MLflow's answer to the forwarded request; Err: the gate's answer instead.
    async fn authorized(
        &self,
        req: Request<Body>,
        canon: &CanonPath,
        identity: &Identity,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Response<Body>> {
        let groups = &identity.groups;
        let query = canonical::query(req.uri().query()).map_err(|e| self.bad_request(&e))?;
        let method = req.method().clone();
        let route = routes::lookup(method.as_str(), &canon.segments, canon.trailing_slash);
        let encoded_query = query.encoded();
        let pq = if encoded_query.is_empty() {
            canon.encoded()
        } else {
            format!("{}?{encoded_query}", canon.encoded())
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = pq
            .parse()
            .map_err(|_| detail(StatusCode::BAD_REQUEST, "Invalid request target"))?;
        if self.policy.is_admin(groups) {
            return Ok(self
                .forward(Request::from_parts(parts, body), Some(identity), peer)
                .await);
        }
        if !self.policy.is_member(groups) {
            return Err(self.forbidden(identity, &method, canon, Decision::NotMember));
        }
        let ask = Ask {
            groups,
            canon,
            query: &query,
            method: &method,
            rule: route.map(|r| r.rule).unwrap_or(Rule::Admin),
            body_kind: route.map(|r| r.body).unwrap_or(BodyKind::Json),
            body_method: !matches!(method, Method::GET | Method::HEAD),
        };
        // Workspaces would give experiment ids another namespace the permissions file knows nothing of.
        parts.headers.remove(WORKSPACE_HEADER);
        if parts.headers.get_all(EXPERIMENT_HEADER).iter().count() > 1 {
            return Err(self.bad_request(&CanonError::Query(format!("{EXPERIMENT_HEADER} given more than once"))));
        }
        let ReadBody {
            mut body,
            json,
            otlp_traces,
        } = self.read_body(&ask, &mut parts, body).await?;
        let (decision, filter_answer) = self.decide(&ask, &parts.headers, json.as_ref(), otlp_traces).await?;
        if decision != Decision::Allow {
            return Err(self.forbidden(identity, &method, canon, decision));
        }
        if filter_answer {
            parts.headers.remove(header::ACCEPT_ENCODING);
            if canon.segments.last().is_some_and(|s| s == "search")
                && let Some(whole) = whole_search(&ask, &mut parts, json)
                    .map_err(|_| detail(StatusCode::BAD_REQUEST, "Invalid request target"))?
            {
                body = whole;
            }
        }
        let resp = self
            .forward(Request::from_parts(parts, body), Some(identity), peer)
            .await;
        if filter_answer {
            return Ok(self.readable_part(resp, groups).await);
        }
        Ok(resp)
    }

    /// MLflow reads a GET's JSON body when it has no query: GETs and HEADs go on without one.
    /// Other JSON bodies are read whole and forwarded in their canonical form. OTLP spans of a
    /// trace that exists join it in its experiment: a writer's OTLP body is read (bounded) to find
    /// its traces.
    async fn read_body(
        &self,
        ask: &Ask<'_>,
        parts: &mut http::request::Parts,
        body: Body,
    ) -> Result<ReadBody, Response<Body>> {
        let read = |body, json| ReadBody {
            body,
            json,
            otlp_traces: Vec::new(),
        };
        let inspect_otlp = ask.rule.is_otlp_ingest() && self.policy.needs_experiments(ask.groups);
        if inspect_otlp {
            return self.read_otlp_body(parts, body).await;
        }
        if !ask.body_method {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::TRANSFER_ENCODING);
            return Ok(read(full(Bytes::new()), None));
        }
        if ask.body_kind == BodyKind::Opaque {
            return Ok(read(body, None));
        }
        let Some(bytes) = read_limited(body, MAX_INSPECTED_BODY).await else {
            return Err(detail(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large for an MLflow API call",
            ));
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::TRANSFER_ENCODING);
        // What is forwarded is the canonical JSON itself, never an encoding of it.
        parts.headers.remove(header::CONTENT_ENCODING);
        match canonical::json_body(&bytes) {
            Ok(Some(m)) => {
                let out = serde_json::to_vec(&m).unwrap_or_default();
                parts
                    .headers
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(read(full(out), Some(m)))
            }
            Ok(None) => Ok(read(full(Bytes::new()), None)),
            Err(e) => Err(self.bad_request(&e)),
        }
    }

    /// An OTLP export read whole (bounded) for its trace ids.
    async fn read_otlp_body(&self, parts: &mut http::request::Parts, body: Body) -> Result<ReadBody, Response<Body>> {
        let Some(bytes) = read_limited(body, MAX_OTLP_BODY).await else {
            return Err(detail(StatusCode::PAYLOAD_TOO_LARGE, "OTLP request body too large"));
        };
        let value = |h| parts.headers.get(h).and_then(|v| v.to_str().ok());
        let read = targets::otlp_trace_ids(
            value(header::CONTENT_TYPE),
            value(header::CONTENT_ENCODING),
            &bytes,
            MAX_OTLP_BODY,
        )
        .map_err(|e| self.bad_request(&e))?;
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::TRANSFER_ENCODING);
        // MLflow gets exactly the bytes the gate read, never a second reading of them.
        let body = match read.decompressed {
            Some(plain) => {
                parts.headers.remove(header::CONTENT_ENCODING);
                full(plain)
            }
            None => full(bytes),
        };
        Ok(ReadBody {
            body,
            json: None,
            otlp_traces: read.trace_ids,
        })
    }

    /// The route's rule applied to what the request names, and whether MLflow's answer must be
    /// cut to what the caller may read.
    async fn decide(
        &self,
        ask: &Ask<'_>,
        headers: &http::HeaderMap,
        json: Option<&JsonBody>,
        otlp_traces: Vec<String>,
    ) -> Result<(Decision, bool), Response<Body>> {
        let groups = ask.groups;
        let decision = match ask.rule {
            Rule::Admin => Decision::AdminOnly(format!(
                "{} {}",
                ask.method,
                ask.canon.decoded().chars().take(100).collect::<String>()
            )),
            Rule::Member => Decision::Allow,
            Rule::ExperimentListing => {
                let filter_answer = self.policy.needs_experiments(groups);
                return Ok((self.policy.decide(groups, Level::Read, &[]), filter_answer));
            }
            Rule::Registry(level) => self.policy.decide_all(groups, level, &[], true),
            Rule::Experiments(_, _) if targets::sets_reserved_trace_tag(&ask.canon.segments, json) => {
                Decision::AdminOnly("setting the trace tag mlflow.artifactLocation".into())
            }
            Rule::Experiments(level, finds) => {
                self.decide_experiments(ask, (level, finds), headers, json, otlp_traces)
                    .await?
            }
            Rule::Graphql => self.decide_graphql(ask, json).await?,
        };
        Ok((decision, false))
    }

    /// `Rule::Experiments`: `level` on every experiment the request names or reaches.
    async fn decide_experiments(
        &self,
        ask: &Ask<'_>,
        (level, finds): (Level, &[Find]),
        headers: &http::HeaderMap,
        json: Option<&JsonBody>,
        mut otlp_traces: Vec<String>,
    ) -> Result<Decision, Response<Body>> {
        let inputs = targets::Inputs {
            segments: &ask.canon.segments,
            query: ask.query,
            body: json,
            // Uploads name their run in the query, as do GETs.
            body_method: ask.body_method && ask.body_kind == BodyKind::Json,
            experiment_header: headers.get(EXPERIMENT_HEADER).and_then(|v| v.to_str().ok()),
        };
        let mut found = targets::find(finds, &inputs).map_err(|e| self.bad_request(&e))?;
        // OTLP ingestion links the traces to the run this header names: a write to the
        // run's experiment, which must be allowed like the traces' own.
        if finds.contains(&Find::OtlpTraces) {
            let named: Vec<&HeaderValue> = headers.get_all(RUN_ID_HEADER).iter().collect();
            match named.as_slice() {
                [] => {}
                [one] => match one.to_str().map(str::trim) {
                    Ok(run) if !run.is_empty() => found.runs.push(run.to_string()),
                    _ => {
                        return Err(self.bad_request(&CanonError::Query(format!("{RUN_ID_HEADER} is not a run id"))));
                    }
                },
                _ => {
                    return Err(self.bad_request(&CanonError::Query(format!("{RUN_ID_HEADER} given more than once"))));
                }
            }
        }
        otlp_traces.append(&mut found.traces_if_exist);
        let existing = if self.policy.needs_experiments(ask.groups) {
            self.existing_trace_experiments(&otlp_traces).await
        } else {
            Some(Vec::new())
        };
        let Some(owners) = existing else {
            return Ok(Decision::Missing {
                need: level,
                experiment: Some("of the traces (look-up failed)".into()),
            });
        };
        found.experiments.extend(owners);
        found.experiments.sort();
        found.experiments.dedup();
        Ok(self.decide_found(ask.groups, level, found).await)
    }

    /// `Rule::Graphql`: each field of the document.
    async fn decide_graphql(&self, ask: &Ask<'_>, json: Option<&JsonBody>) -> Result<Decision, Response<Body>> {
        if !ask.query.0.is_empty() {
            // graphene would let query parameters override the body.
            return Err(self.bad_request(&CanonError::Query("GraphQL takes no query parameters".into())));
        }
        let empty = serde_json::Map::new();
        let needs = super::graphql::needs(json.unwrap_or(&empty)).map_err(|e| self.bad_request(&e))?;
        if let Some(f) = needs.admin.first() {
            return Ok(Decision::AdminOnly(format!("GraphQL field {f}")));
        }
        let registry = if needs.registry {
            self.policy.decide_all(ask.groups, Level::Read, &[], true)
        } else {
            Decision::Allow
        };
        Ok(if registry != Decision::Allow {
            registry
        } else if needs.found.is_empty() && !needs.found.everywhere {
            Decision::Allow
        } else {
            self.decide_found(ask.groups, Level::Read, needs.found).await
        })
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

/// A search whose answer is cut must not tell whether hidden experiments matched: one page holding
/// every match (MLflow's own maximum), no page tokens either way. Some: the new body (the paging
/// was in it); None: the query was rewritten and the body stays.
fn whole_search(
    ask: &Ask<'_>,
    parts: &mut http::request::Parts,
    json: Option<JsonBody>,
) -> Result<Option<Body>, http::uri::InvalidUri> {
    if ask.body_method {
        let mut m = json.unwrap_or_default();
        m.retain(|k, _| !SEARCH_PAGING.contains(&k.as_str()));
        m.insert("max_results".into(), SEARCH_MAX_RESULTS.into());
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(Some(full(serde_json::to_vec(&m).unwrap_or_default())));
    }
    let pairs: Vec<(String, String)> = ask
        .query
        .0
        .iter()
        .filter(|(k, _)| !SEARCH_PAGING.contains(&k.as_str()))
        .cloned()
        .chain([("max_results".to_string(), SEARCH_MAX_RESULTS.to_string())])
        .collect();
    let q = canonical::Query(pairs).encoded();
    parts.uri = format!("{}?{q}", ask.canon.encoded()).parse()?;
    Ok(None)
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
