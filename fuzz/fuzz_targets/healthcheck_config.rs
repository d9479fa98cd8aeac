//! The health sidecar's TOML configuration (`wglb-healthcheck.toml`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = wglb_healthcheck::config::Config::parse(text, "fuzz.toml", None) {
        // An operator must be told what is wrong.
        assert!(!e.to_string().is_empty());
    }
});
