//! A client for the agent's Prometheus endpoint (`[metrics] prometheus = true`): fetch the
//! exposition text and read it into `name{labels}` -> value, for the bench, the demo's status
//! line and the system tests.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fetches `/metrics` from `127.0.0.1:port` and returns the body.
pub async fn scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "scrape failed: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

/// Reads exposition text into `name{labels}` -> value (comments and blank lines skipped).
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// [`scrape`] then [`parse`].
pub async fn scrape_parsed(port: u16) -> std::io::Result<HashMap<String, f64>> {
    Ok(parse(&scrape(port).await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_samples_with_labels() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{source=\"mqtt\"} 12\n\
                    b 2.5\n\nbad line\n";
        let v = super::parse(text);
        assert_eq!(v[r#"a_total{source="mqtt"}"#], 12.0);
        assert_eq!(v["b"], 2.5);
        assert_eq!(v.len(), 2);
    }
}
