//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with a pure-Rust
//! protobuf compiler (protox), so building needs no `protoc`.
fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"]).expect("compile onnx.proto");
    let mut config = prost_build::Config::new();
    // `bytes::Bytes` lets tensor payloads decoded from a memory-mapped file stay slices of it.
    config.bytes(["."]);
    config
        .compile_fds(descriptors)
        .expect("generate ONNX protobuf types");
}
