//! A Triton config.pbtxt (protobuf text format): parsed, mapped onto
//! shoal's config, then resolved against the model's graph.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = shoal::engine::pbtxt::parse("m", "m/config.pbtxt", text) {
        let _ = parsed.config.resolve("m", &shoal_fuzz::graph());
    }
});
