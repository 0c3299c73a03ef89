//! Compiles the project's own protobuf schemas in proto/ (the spool record envelope) with protox,
//! a pure-Rust protobuf compiler, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/spool.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
