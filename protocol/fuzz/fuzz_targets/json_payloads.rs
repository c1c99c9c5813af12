//! Every JSON decoder on arbitrary bytes. Whatever a decoder accepts, its
//! encoder must write and the decoder must read back unchanged.
#![no_main]

use edgestream_protocol::json;
use edgestream_protocol::types::AlertEvent;
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
        let (gw2, b) = json::decode_alert(&out).unwrap();
        // An alert without a value holds NaN, which is not equal to itself.
        assert_eq!(a.value.is_nan(), b.value.is_nan());
        let known = |v: f64| if v.is_nan() { 0.0 } else { v };
        let (a, b) = (
            AlertEvent { value: known(a.value), ..a },
            AlertEvent { value: known(b.value), ..b },
        );
        assert_eq!((gw2, b), (gw, a));
    }
    if let Ok((gw, a)) = json::decode_aggregate(data) {
        json::encode_aggregate(&gw, &a, &mut out).unwrap();
        assert_eq!(json::decode_aggregate(&out).unwrap(), (gw, a));
    }
});
