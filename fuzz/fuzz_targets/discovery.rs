#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = fastcache_passes::fuzzing::discovery(bytes);
});
