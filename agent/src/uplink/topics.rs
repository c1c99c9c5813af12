//! The cloud-side topic scheme (documented in docs/topics.md).

/// Every cloud topic of one gateway: `{prefix}/{gateway}/...`.
#[derive(Debug, Clone)]
pub struct CloudTopics {
    /// `{prefix}/{gateway}`.
    pub base: String,
    pub telemetry: String,
    pub alerts: String,
    pub aggregates: String,
    pub status: String,
    pub health: String,
    pub commands: String,
    pub rules_set: String,
    pub deadletter: String,
}

impl CloudTopics {
    pub fn new(prefix: &str, gateway: &str) -> Self {
        let t = |s: &str| format!("{prefix}/{gateway}/{s}");
        Self {
            base: format!("{prefix}/{gateway}"),
            telemetry: t("telemetry"),
            alerts: t("alerts"),
            aggregates: t("aggregates"),
            status: t("status"),
            health: t("health"),
            commands: t("commands"),
            rules_set: t("rules/set"),
            deadletter: t("deadletter"),
        }
    }
}

impl CloudTopics {
    /// `{prefix}/{gateway}/{suffix}`.
    pub fn under(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }
}

/// Reads `{device}/{metric}` from the last two levels of a local reading topic
/// (`sensors/boiler-1/temperature`).
pub fn device_metric(topic: &str) -> Option<(&str, &str)> {
    let mut it = topic.rsplitn(3, '/');
    let metric = it.next()?;
    let device = it.next()?;
    Some((device, metric))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_metric_are_the_last_two_levels() {
        assert_eq!(device_metric("sensors/b-1/temp"), Some(("b-1", "temp")));
        assert_eq!(
            device_metric("site/3/sensors/b-1/temp"),
            Some(("b-1", "temp"))
        );
        assert_eq!(device_metric("b-1/temp"), Some(("b-1", "temp")));
        assert_eq!(device_metric("temp"), None);
    }
}
