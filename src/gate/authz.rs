//! Authorization: group membership, then READ / EDIT / MANAGE per experiment from GATE_PERMISSIONS_FILE.
//! Pure: groups, the level a request needs and every experiment it reaches in, a decision out.
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Level {
    Read,
    Edit,
    Manage,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Read => "READ",
            Level::Edit => "EDIT",
            Level::Manage => "MANAGE",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    Any,
    /// An experiment id (all digits).
    Id(String),
    /// A glob (`*`, `?`) over the experiment name.
    Name(String),
}

impl Pattern {
    fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if crate::otlp::ExperimentId::is_valid(s) {
            Pattern::Id(s.to_string())
        } else {
            Pattern::Name(s.to_string())
        }
    }

    fn matches(&self, e: &Experiment) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Id(id) => *id == e.id,
            Pattern::Name(g) => e.name.as_deref().is_some_and(|n| glob(g, n)),
        }
    }
}

/// `*` matches any run of characters, `?` one character; everything else literally.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The parsed GATE_PERMISSIONS_FILE:
/// ```yaml
/// groups:
///   mlflow-readers:
///     "*": READ
///   team-a:
///     "12": MANAGE        # experiment id
///     "team-a-*": EDIT    # experiment name glob
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Permissions {
    pub(crate) groups: BTreeMap<String, Vec<(Pattern, Level)>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    groups: BTreeMap<String, BTreeMap<String, String>>,
}

impl Permissions {
    pub(crate) fn parse(yaml: &str) -> Result<Permissions, Vec<String>> {
        let file: PermissionsFile = serde_norway::from_str(yaml).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let mut groups = BTreeMap::new();
        for (group, rules) in file.groups {
            let mut parsed = Vec::new();
            for (pattern, level) in rules {
                let level = match level.to_ascii_uppercase().as_str() {
                    "READ" => Level::Read,
                    "EDIT" => Level::Edit,
                    "MANAGE" => Level::Manage,
                    _ => {
                        problems.push(format!(
                            "groups.{group}.{pattern}: {level:?} is not READ, EDIT or MANAGE"
                        ));
                        continue;
                    }
                };
                parsed.push((Pattern::parse(&pattern), level));
            }
            groups.insert(group, parsed);
        }
        if problems.is_empty() {
            Ok(Permissions { groups })
        } else {
            Err(problems)
        }
    }

    /// Some rule matches experiments by name, so names must be looked up.
    pub(crate) fn needs_names(&self) -> bool {
        self.groups
            .values()
            .flatten()
            .any(|(p, _)| matches!(p, Pattern::Name(_)))
    }
}

/// An experiment a request touches; the name is known only when it was looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Experiment {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow,
    /// In neither OIDC_GROUP_NAME nor the admin group.
    NotMember,
    Missing {
        need: Level,
        experiment: Option<String>,
    },
    /// A route, GraphQL field or tag only the admin group may use.
    AdminOnly(String),
}

impl Decision {
    /// The 403 body's explanation.
    pub(crate) fn detail(&self) -> String {
        match self {
            Decision::Allow => String::new(),
            Decision::NotMember => "Permission denied: not a member of an allowed group".into(),
            Decision::Missing {
                need,
                experiment: Some(e),
            } => format!("Permission denied: {need} permission on experiment {e} required"),
            Decision::Missing { need, experiment: None } => {
                format!("Permission denied: {need} permission required")
            }
            Decision::AdminOnly(what) => format!("Permission denied: {what} is for admins only"),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) member_groups: Vec<String>,
    pub(crate) admin_group: String,
    pub(crate) permissions: Option<Permissions>,
}

impl Policy {
    pub(crate) fn needs_names(&self) -> bool {
        self.permissions.as_ref().is_some_and(Permissions::needs_names)
    }

    /// Whether the request's experiments matter (only with a permissions file and for non-admins).
    pub(crate) fn needs_experiments(&self, groups: &[String]) -> bool {
        self.permissions.is_some() && !groups.contains(&self.admin_group)
    }

    /// Decides whether a caller in `groups` may do something needing `need` on `experiments`
    /// (empty: the request names no experiment we could find).
    pub(crate) fn decide(&self, groups: &[String], need: Level, experiments: &[Experiment]) -> Decision {
        if groups.contains(&self.admin_group) {
            return Decision::Allow;
        }
        if !groups.iter().any(|g| self.member_groups.contains(g)) {
            return Decision::NotMember;
        }
        let Some(perms) = &self.permissions else {
            // Without a file, members may do everything but delete.
            return if need <= Level::Edit {
                Decision::Allow
            } else {
                Decision::Missing { need, experiment: None }
            };
        };
        let rules = || groups.iter().filter_map(|g| perms.groups.get(g)).flatten();
        if experiments.is_empty() {
            // Reads that name no experiment (search across experiments) need READ somewhere; writes need
            // the level on every experiment ("*"), since we cannot tell which one they touch.
            let best = if need == Level::Read {
                rules().map(|(_, l)| *l).max()
            } else {
                rules().filter(|(p, _)| *p == Pattern::Any).map(|(_, l)| *l).max()
            };
            return if best.is_some_and(|b| b >= need) {
                Decision::Allow
            } else {
                Decision::Missing { need, experiment: None }
            };
        }
        for e in experiments {
            let best = rules().filter(|(p, _)| p.matches(e)).map(|(_, l)| *l).max();
            if best.is_none_or(|b| b < need) {
                return Decision::Missing {
                    need,
                    experiment: Some(e.id.clone()),
                };
            }
        }
        Decision::Allow
    }
}

impl Policy {
    pub(crate) fn is_admin(&self, groups: &[String]) -> bool {
        groups.contains(&self.admin_group)
    }

    /// In OIDC_GROUP_NAME (or the admin group).
    pub(crate) fn is_member(&self, groups: &[String]) -> bool {
        self.is_admin(groups) || groups.iter().any(|g| self.member_groups.contains(g))
    }

    /// Like [`Policy::decide`] for a request whose targets are all known: `need` on every one of
    /// `experiments`, and with `everywhere` (a write that names no experiment, the model registry, an
    /// artifact path outside any experiment) on every experiment: a `"*"` rule.
    pub(crate) fn decide_all(
        &self,
        groups: &[String],
        need: Level,
        experiments: &[Experiment],
        everywhere: bool,
    ) -> Decision {
        if let Some(perms) = &self.permissions
            && everywhere
            && !self.is_admin(groups)
        {
            if !self.is_member(groups) {
                return Decision::NotMember;
            }
            let star = groups
                .iter()
                .filter_map(|g| perms.groups.get(g))
                .flatten()
                .filter(|(p, _)| *p == Pattern::Any)
                .map(|(_, l)| *l)
                .max();
            if star.is_none_or(|b| b < need) {
                return Decision::Missing {
                    need,
                    experiment: Some("*".into()),
                };
            }
        }
        if experiments.is_empty() && !everywhere {
            // Nothing to check per experiment: membership (and without a file, the level) decides.
            return match self.decide(groups, need, &[]) {
                Decision::NotMember => Decision::NotMember,
                d if self.permissions.is_none() => d,
                _ => Decision::Allow,
            };
        }
        self.decide(groups, need, experiments)
    }
}

/// What a read that named no experiment may see of MLflow's answer.
#[derive(Debug, PartialEq)]
pub(crate) enum Visible {
    /// Nothing in it belongs to an experiment the caller may not read.
    All,
    /// `experiments` (a search or list) with the entries the caller may not read removed.
    Filtered(serde_json::Value),
    /// A single `experiment` (get-by-name) the caller may not read: its id.
    Denied(String),
}

/// Applies READ per experiment to an MLflow answer: `experiments: [...]` is filtered and a single
/// `experiment: {...}` refused, using `allowed` on each entry's id and name.
pub(crate) fn visible(mut answer: serde_json::Value, allowed: impl Fn(&Experiment) -> bool) -> Visible {
    let entry = |v: &serde_json::Value| Experiment {
        id: v
            .get("experiment_id")
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string(),
        name: v.get("name").and_then(|x| x.as_str()).map(str::to_owned),
    };
    if let Some(one) = answer.get("experiment") {
        let e = entry(one);
        return if allowed(&e) {
            Visible::All
        } else {
            Visible::Denied(e.id)
        };
    }
    // A cut answer looks like an uncut one: no list when nothing is left (as MLflow answers an
    // empty search), and no page token (the gate asked for every match at once).
    let Some(obj) = answer.as_object_mut() else {
        return Visible::All;
    };
    if !obj.contains_key("experiments") && !obj.contains_key("next_page_token") {
        return Visible::All;
    }
    {
        obj.remove("next_page_token");
        if let Some(serde_json::Value::Array(list)) = obj.get_mut("experiments") {
            list.retain(|v| allowed(&entry(v)));
            if list.is_empty() {
                obj.remove("experiments");
            }
        }
    }
    Visible::Filtered(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_show_only_readable_experiments() {
        let only_a = |e: &Experiment| e.id == "1" || e.name.as_deref() == Some("a");
        let search = serde_json::json!({"experiments": [
            {"experiment_id": "1", "name": "a"}, {"experiment_id": "2", "name": "b"}
        ], "next_page_token": "t"});
        match visible(search, only_a) {
            Visible::Filtered(v) => {
                assert_eq!(v["experiments"].as_array().unwrap().len(), 1);
                assert_eq!(v["experiments"][0]["name"], "a");
                assert!(
                    v.get("next_page_token").is_none(),
                    "no page token tells of hidden matches"
                );
            }
            other => panic!("{other:?}"),
        }
        // Everything hidden looks like an empty search (MLflow omits the empty list).
        let hidden = serde_json::json!({"experiments": [{"experiment_id": "2", "name": "b"}], "next_page_token": "t"});
        assert_eq!(visible(hidden, only_a), Visible::Filtered(serde_json::json!({})));
        let mine = serde_json::json!({"experiments": [{"experiment_id": "1", "name": "a"}]});
        assert_eq!(visible(mine.clone(), only_a), Visible::Filtered(mine));
        let other = serde_json::json!({"experiment": {"experiment_id": "2", "name": "b"}});
        assert_eq!(visible(other, only_a), Visible::Denied("2".into()));
        let unrelated = serde_json::json!({"registered_models": []});
        assert_eq!(visible(unrelated, only_a), Visible::All);
    }

    fn exp(id: &str, name: &str) -> Experiment {
        Experiment {
            id: id.into(),
            name: Some(name.into()),
        }
    }
    fn g(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy(file: Option<&str>) -> Policy {
        Policy {
            member_groups: g(&["mlflow", "readers", "team-a"]),
            admin_group: "mlflow-admin".into(),
            permissions: file.map(|f| Permissions::parse(f).unwrap()),
        }
    }

    const FILE: &str = "groups:\n  readers:\n    \"*\": READ\n  team-a:\n    \"7\": MANAGE\n    \"team-a-*\": EDIT\n";

    #[test]
    fn membership_and_admin() {
        let p = policy(Some(FILE));
        assert_eq!(p.decide(&g(&["other"]), Level::Read, &[]), Decision::NotMember);
        assert_eq!(p.decide(&[], Level::Read, &[]), Decision::NotMember);
        assert_eq!(
            p.decide(&g(&["mlflow-admin"]), Level::Manage, &[exp("1", "x")]),
            Decision::Allow
        );
    }

    #[test]
    fn without_a_file_members_edit_everywhere() {
        let p = policy(None);
        assert_eq!(
            p.decide(&g(&["mlflow"]), Level::Edit, &[exp("1", "x")]),
            Decision::Allow
        );
        assert!(matches!(
            p.decide(&g(&["mlflow"]), Level::Manage, &[]),
            Decision::Missing {
                need: Level::Manage,
                ..
            }
        ));
    }

    #[test]
    fn file_rules_by_id_and_name_glob() {
        let p = policy(Some(FILE));
        let readers = g(&["readers"]);
        assert_eq!(p.decide(&readers, Level::Read, &[exp("3", "any")]), Decision::Allow);
        assert_eq!(p.decide(&readers, Level::Read, &[]), Decision::Allow);
        let d = p.decide(&readers, Level::Edit, &[exp("3", "any")]);
        assert_eq!(
            d.detail(),
            "Permission denied: EDIT permission on experiment 3 required"
        );
        let a = g(&["team-a"]);
        assert_eq!(p.decide(&a, Level::Manage, &[exp("7", "whatever")]), Decision::Allow);
        assert_eq!(p.decide(&a, Level::Edit, &[exp("9", "team-a-prod")]), Decision::Allow);
        assert!(matches!(
            p.decide(&a, Level::Manage, &[exp("9", "team-a-prod")]),
            Decision::Missing { .. }
        ));
        assert!(matches!(
            p.decide(&a, Level::Read, &[exp("9", "team-b")]),
            Decision::Missing { .. }
        ));
        // Name unknown: a name glob cannot match.
        let unnamed = Experiment {
            id: "9".into(),
            name: None,
        };
        assert!(matches!(
            p.decide(&a, Level::Read, &[unnamed]),
            Decision::Missing { .. }
        ));
        // Writes naming no experiment need a "*" rule.
        assert!(matches!(
            p.decide(&a, Level::Edit, &[]),
            Decision::Missing { experiment: None, .. }
        ));
        // Every experiment of a request must pass.
        assert!(matches!(
            p.decide(&a, Level::Read, &[exp("7", "x"), exp("8", "y")]),
            Decision::Missing { experiment: Some(e), .. } if e == "8"
        ));
        // Groups add up: the best rule wins.
        assert_eq!(
            p.decide(&g(&["readers", "team-a"]), Level::Read, &[exp("8", "y")]),
            Decision::Allow
        );
        assert!(p.needs_names());
    }

    #[test]
    fn file_errors() {
        let e = Permissions::parse("groups:\n  a:\n    \"*\": WRITE\n").unwrap_err();
        assert!(e[0].contains("groups.a.*"), "{e:?}");
        assert!(Permissions::parse("group: {}\n").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob("team-*", "team-a"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(glob("*-prod-*", "x-prod-y"));
        assert!(!glob("team-*", "xteam-a"));
        assert!(!glob("a?c", "ac"));
    }

    #[test]
    fn all_targets_and_everywhere() {
        let p = policy(Some(
            "groups:\n  team-a:\n    \"7\": EDIT\n    \"team-a-*\": EDIT\n  readers:\n    \"*\": READ\n",
        ));
        let a = g(&["team-a"]);
        assert_eq!(p.decide_all(&a, Level::Edit, &[exp("7", "x")], false), Decision::Allow);
        // A decoy next to the real target does not help.
        assert!(matches!(
            p.decide_all(&a, Level::Edit, &[exp("7", "x"), exp("8", "y")], false),
            Decision::Missing { experiment: Some(e), .. } if e == "8"
        ));
        // Writes naming nothing, the registry: a "*" rule at that level.
        assert!(matches!(
            p.decide_all(&a, Level::Edit, &[], true),
            Decision::Missing { experiment: Some(e), .. } if e == "*"
        ));
        assert!(matches!(
            p.decide_all(&a, Level::Read, &[], true),
            Decision::Missing { .. }
        ));
        assert_eq!(p.decide_all(&g(&["readers"]), Level::Read, &[], true), Decision::Allow);
        assert!(matches!(
            p.decide_all(&g(&["readers"]), Level::Edit, &[], true),
            Decision::Missing { .. }
        ));
        // A new name: only name globs and "*" match it.
        let new = |n: &str| Experiment {
            id: format!("new:{n}"),
            name: Some(n.into()),
        };
        assert_eq!(
            p.decide_all(&a, Level::Edit, &[new("team-a-new")], false),
            Decision::Allow
        );
        assert!(matches!(
            p.decide_all(&a, Level::Edit, &[new("7")], false),
            Decision::Missing { .. }
        ));
        // Members only; admins everything; no file: members up to EDIT.
        assert_eq!(p.decide_all(&g(&["x"]), Level::Read, &[], false), Decision::NotMember);
        assert_eq!(
            p.decide_all(&g(&["mlflow-admin"]), Level::Manage, &[], true),
            Decision::Allow
        );
        let open = policy(None);
        assert_eq!(
            open.decide_all(&g(&["mlflow"]), Level::Edit, &[], true),
            Decision::Allow
        );
        assert!(matches!(
            open.decide_all(&g(&["mlflow"]), Level::Manage, &[], true),
            Decision::Missing { .. }
        ));
        assert!(p.is_member(&g(&["mlflow-admin"])) && p.is_member(&a) && !p.is_member(&g(&["x"])));
    }
}
