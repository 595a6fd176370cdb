//! CPU time the hypervisor gave to something else while this machine's CPUs had work
//! (`steal` in `/proc/stat`). On a shared virtual machine it shows up as stalls in
//! every latency, so the report gives it for each target next to its percentiles.

use std::time::Duration;

/// Steal time of all CPUs since boot; `None` where the kernel does not report it.
pub fn total() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks = parse(&stat)?;
        let per_second = rustix::param::clock_ticks_per_second();
        (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The `steal` field (the 8th number) of the aggregate `cpu` line, in clock ticks.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_ascii_whitespace().nth(8)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_aggregate_steal_field() {
        let stat = "cpu  6876612 980573 872233 6130413 46386 0 118057 25533 0 0\n\
                    cpu0 3306928 477130 415166 3242839 17099 0 50094 12690 0 0\n";
        assert_eq!(parse(stat), Some(25533));
        assert_eq!(parse("cpu  1 2 3\n"), None);
        assert_eq!(parse("intr 1 2\n"), None);
    }
}
