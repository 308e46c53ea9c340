use fastcache_passes::analysis::discover;
use fastcache_passes::ir::Model;
#[test]
fn scratch() {
    for name in ["sd3_ts", "sd3_dynamo", "flux_ts"] {
        let mut model = Model::load(std::path::Path::new(&format!(
            "../models/fixtures/{name}.onnx"
        )))
        .unwrap();
        let stack = discover(&model).unwrap().stack().clone();
        let config = fastcache_passes::tokens::TokenConfig::new(0.5);
        match fastcache_passes::tokens::apply_token_selection(&mut model, &stack, &config) {
            Ok(s) => println!("{name}: ok inserted={} tokens={}", s.inserted, s.tokens),
            Err(e) => println!("{name}: {e}"),
        }
    }
}
