//! Every JSON decoder on arbitrary bytes. Whatever a decoder accepts, its
//! encoder must write and the decoder must read back unchanged.
#![no_main]

use edgestream_protocol::json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = json::decode_local_reading(data) {
        assert!(r.value.is_finite());
    }
    let mut out = Vec::new();
    if let Ok(c) = json::decode_command(data) {
        json::encode_command(&c, &mut out).unwrap();
        assert_eq!(json::decode_command(&out).unwrap(), c);
    }
    if let Ok(o) = json::decode_outcome(data) {
        json::encode_outcome(&o, &mut out).unwrap();
        assert_eq!(json::decode_outcome(&out).unwrap(), o);
    }
    if let Ok(b) = json::decode_bundle(data) {
        json::encode_bundle(&b, &mut out).unwrap();
        assert_eq!(json::decode_bundle(&out).unwrap(), b);
    }
    if let Ok(s) = json::decode_bundle_status(data) {
        json::encode_bundle_status(&s, &mut out).unwrap();
        assert_eq!(json::decode_bundle_status(&out).unwrap(), s);
    }
    if let Ok(b) = json::decode_telemetry_batch(data) {
        json::encode_telemetry_batch(&b.gateway, &b.readings, &mut out).unwrap();
        assert_eq!(json::decode_telemetry_batch(&out).unwrap(), b);
    }
    if let Ok((gw, a)) = json::decode_alert(data) {
        json::encode_alert(&gw, &a, &mut out).unwrap();
        assert_eq!(json::decode_alert(&out).unwrap(), (gw, a));
    }
    if let Ok((gw, a)) = json::decode_aggregate(data) {
        json::encode_aggregate(&gw, &a, &mut out).unwrap();
        assert_eq!(json::decode_aggregate(&out).unwrap(), (gw, a));
    }
});
