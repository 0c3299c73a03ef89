//! OTTL contexts (`resource`, `scope`, `span`, `spanevent`): what a bare path means in each.
//! The evaluator knows fully qualified paths (`resource.attributes`, `instrumentation_scope.name`,
//! `spanevent.name`, span fields bare or under `span.`), so a statement is rewritten to them once,
//! when compiled, and paths of contexts below the statement's are refused there.
use serde::Deserialize;

use super::eval::CompileError;
use super::{Call, Condition, Expr, Field, Path, Statement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Context {
    Resource,
    Scope,
    Span,
    Spanevent,
}

impl Context {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Context::Resource => "resource",
            Context::Scope => "scope",
            Context::Span => "span",
            Context::Spanevent => "spanevent",
        }
    }

    /// The context a statement without one runs in, from its paths (the collector infers it the
    /// same way): `spanevent.` paths need the span event context, everything else runs per span.
    pub(crate) fn infer(statement: &Statement) -> Context {
        let mut event = false;
        visit_statement(statement, &mut |p: &Path| {
            event |= p.fields.first().is_some_and(|f| f.name == "spanevent");
        });
        if event { Context::Spanevent } else { Context::Span }
    }

    /// Rewrites the paths of `statement` to the evaluator's qualified ones.
    pub(crate) fn rebase_statement(self, statement: &mut Statement) -> Result<(), CompileError> {
        check_call(self, &statement.editor)?;
        for arg in &mut statement.editor.args {
            self.rebase_expr(&mut arg.value)?;
        }
        if let Some(condition) = &mut statement.condition {
            self.rebase_condition(condition)?;
        }
        Ok(())
    }

    pub(crate) fn rebase_condition(self, condition: &mut Condition) -> Result<(), CompileError> {
        match condition {
            Condition::Or(terms) | Condition::And(terms) => terms.iter_mut().try_for_each(|t| self.rebase_condition(t)),
            Condition::Not(inner) => self.rebase_condition(inner),
            Condition::Const(_) => Ok(()),
            Condition::Converter(call) => self.rebase_call(call),
            Condition::Compare(left, _, right) => {
                self.rebase_expr(left)?;
                self.rebase_expr(right)
            }
        }
    }

    fn rebase_call(self, call: &mut Call) -> Result<(), CompileError> {
        check_call(self, call)?;
        call.args.iter_mut().try_for_each(|a| self.rebase_expr(&mut a.value))
    }

    fn rebase_expr(self, expr: &mut Expr) -> Result<(), CompileError> {
        match expr {
            Expr::Path(path) => self.rebase_path(path),
            Expr::List(items) => items.iter_mut().try_for_each(|e| self.rebase_expr(e)),
            Expr::Map(entries) => entries.iter_mut().try_for_each(|(_, v)| self.rebase_expr(v)),
            Expr::Converter(call) => self.rebase_call(call),
            Expr::Math(left, _, right) => {
                self.rebase_expr(left)?;
                self.rebase_expr(right)
            }
            _ => Ok(()),
        }
    }

    fn rebase_path(self, path: &mut Path) -> Result<(), CompileError> {
        let first = path.fields.first().map(|f| f.name.clone()).unwrap_or_default();
        let below = |what: &str| CompileError(format!("{what} paths are not available in the {} context", self.name()));
        let prefix = match (self, first.as_str()) {
            (_, "resource") => None,
            (Context::Resource, _) => Some("resource"),
            (_, "instrumentation_scope" | "scope") => None,
            (Context::Scope, "span" | "spanevent") => return Err(below(&first)),
            (Context::Scope, _) => Some("instrumentation_scope"),
            (Context::Span, "spanevent") => return Err(below("spanevent")),
            (Context::Span, _) => None,
            (Context::Spanevent, "span" | "spanevent") => None,
            (Context::Spanevent, _) => Some("spanevent"),
        };
        if let Some(prefix) = prefix {
            path.fields.insert(
                0,
                Field {
                    name: prefix.to_string(),
                    keys: Vec::new(),
                },
            );
        }
        Ok(())
    }
}

/// Converters that need a span cannot run above one.
fn check_call(context: Context, call: &Call) -> Result<(), CompileError> {
    if call.name == "IsRootSpan" && matches!(context, Context::Resource | Context::Scope) {
        return Err(CompileError(format!(
            "IsRootSpan() needs a span; it is not available in the {} context",
            context.name()
        )));
    }
    Ok(())
}

fn visit_statement(statement: &Statement, f: &mut dyn FnMut(&Path)) {
    statement.editor.args.iter().for_each(|a| visit_expr(&a.value, f));
    if let Some(c) = &statement.condition {
        visit_condition(c, f);
    }
}

fn visit_condition(condition: &Condition, f: &mut dyn FnMut(&Path)) {
    match condition {
        Condition::Or(terms) | Condition::And(terms) => terms.iter().for_each(|t| visit_condition(t, f)),
        Condition::Not(inner) => visit_condition(inner, f),
        Condition::Const(_) => {}
        Condition::Converter(call) => call.args.iter().for_each(|a| visit_expr(&a.value, f)),
        Condition::Compare(left, _, right) => {
            visit_expr(left, f);
            visit_expr(right, f);
        }
    }
}

fn visit_expr(expr: &Expr, f: &mut dyn FnMut(&Path)) {
    match expr {
        Expr::Path(p) => f(p),
        Expr::List(items) => items.iter().for_each(|e| visit_expr(e, f)),
        Expr::Map(entries) => entries.iter().for_each(|(_, v)| visit_expr(v, f)),
        Expr::Converter(call) => call.args.iter().for_each(|a| visit_expr(&a.value, f)),
        Expr::Math(left, _, right) => {
            visit_expr(left, f);
            visit_expr(right, f);
        }
        _ => {}
    }
}
