//! OTTL, the collector's transformation language, as the `filter` and `transform` processors
//! use it: the syntax tree here, the parser in `parse`. Paths and functions are given meaning by
//! the evaluator (`eval`), not by the grammar (the collector splits it the same way).
pub(crate) mod compile;
pub(crate) mod context;
pub(crate) mod eval;
pub(crate) mod parse;
pub(crate) mod target;

/// `editor(args) where condition`: one statement of a `transform` processor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Statement {
    pub(crate) editor: Call,
    pub(crate) condition: Option<Condition>,
}

/// An editor (lowercase name) or converter (uppercase name) invocation. Converters may index
/// their result: `Split(name, "/")[0]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Call {
    pub(crate) name: String,
    pub(crate) args: Vec<Arg>,
    pub(crate) keys: Vec<Key>,
}

/// A positional or named (`pattern = "x"`) argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Arg {
    pub(crate) name: Option<String>,
    pub(crate) value: Expr,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Key {
    Str(String),
    Int(i64),
}

/// `resource.attributes["k"]`: dotted lowercase fields, each with optional keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Path {
    pub(crate) fields: Vec<Field>,
    /// Where the path points, filled in when its statement or condition is compiled, so that
    /// evaluation does not resolve the names again for every span; `None` from the parser.
    pub(crate) place: Option<compile::Place>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) keys: Vec<Key>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MathOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// A value: literal, path, enum, list, map, converter call, or arithmetic over them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// An uppercase name without parentheses: `SPAN_KIND_SERVER`, `STATUS_CODE_ERROR`.
    Enum(String),
    Path(Path),
    List(Vec<Expr>),
    Map(Vec<(String, Expr)>),
    Converter(Call),
    Math(Box<Expr>, MathOp, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A boolean expression: `where` clauses, and the conditions of the `filter` processor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Condition {
    Or(Vec<Condition>),
    And(Vec<Condition>),
    Not(Box<Condition>),
    Const(bool),
    /// A converter returning a boolean: `IsRootSpan()`, `IsMatch(name, "^GET")`.
    Converter(Call),
    Compare(Expr, CompareOp, Expr),
}

#[cfg(test)]
mod fuzz_tests;
