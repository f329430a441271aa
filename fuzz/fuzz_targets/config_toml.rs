//! A model's config.toml: parsed, then resolved against the model's graph.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::engine::ModelConfigFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = ModelConfigFile::parse("m", text) {
        let _ = file.resolve("m", &shoal_fuzz::graph());
    }
});
