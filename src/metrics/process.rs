//! The standard `process_*` metrics every Prometheus client library exports
//! (CPU, memory, file descriptors, start time), read from `/proc/self` on
//! each scrape, with the names and units those libraries use so existing
//! dashboards and alerts apply unchanged. Off Linux they are left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub(super) struct ProcessCollector;

/// What `/proc/self` says about this process right now.
#[derive(Debug, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    open_fds: f64,
    max_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A scrape never fails for these: a process without /proc shows none.
        let Some(s) = sample() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let mut gauge = |name: &str, help: &str, value: f64| {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            s.resident_bytes,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            s.virtual_bytes,
        )?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors",
            s.open_fds,
        )?;
        if let Some(max) = s.max_fds {
            gauge(
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        if let Some(start) = s.start_time_seconds {
            gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                start,
            )?;
        }
        Ok(())
    }
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100.0);
    let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096.0);
    parse(&stat, &statm, &limits, &boot, ticks, page, open_fds)
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<f64> {
    let v = nix::unistd::sysconf(var).ok()??;
    #[allow(
        clippy::cast_precision_loss,
        reason = "tick rates and page sizes are small"
    )]
    Some(v as f64)
}

/// `/proc/self/stat` fields after the command name (which may hold spaces
/// and parentheses, so the text is cut at its last `)`): utime is field 14,
/// stime 15, starttime 22 (1-based, in clock ticks since boot).
fn parse(
    stat: &str,
    statm: &str,
    limits: &str,
    proc_stat: &str,
    ticks: f64,
    page: f64,
    open_fds: usize,
) -> Option<Sample> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse::<f64>().ok() };
    let cpu_seconds = (field(14)? + field(15)?) / ticks;
    let mut pages = statm.split_whitespace().map(|v| v.parse::<f64>().ok());
    let virtual_bytes = pages.next()?? * page;
    let resident_bytes = pages.next()?? * page;
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<f64>().ok());
    let boot_time = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let start_time_seconds = boot_time.and_then(|b| Some(b + field(22)? / ticks));
    #[allow(clippy::cast_precision_loss, reason = "a descriptor count")]
    let open_fds = open_fds as f64;
    Some(Sample {
        cpu_seconds,
        resident_bytes,
        virtual_bytes,
        open_fds,
        max_fds,
        start_time_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields_even_with_a_command_name_holding_spaces_and_parens() {
        // A real line's shape: pid (comm) state ppid ... utime=250 stime=50 ... starttime=12345.
        let stat = "4242 (avatar (w) arden) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 9 0 12345 100000000 5000 18446744073709551615";
        let statm = "24414 5000 1200 300 0 20000 0";
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1048576              1048576              files     \n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let s = parse(stat, statm, limits, proc_stat, 100.0, 4096.0, 7).unwrap();
        assert_eq!(
            s,
            Sample {
                cpu_seconds: 3.0,
                resident_bytes: 5000.0 * 4096.0,
                virtual_bytes: 24414.0 * 4096.0,
                open_fds: 7.0,
                max_fds: Some(1_048_576.0),
                start_time_seconds: Some(1_700_000_123.45),
            }
        );
        assert_eq!(
            parse("garbage", statm, limits, proc_stat, 100.0, 4096.0, 1),
            None
        );
    }

    #[test]
    fn this_process_has_plausible_figures() {
        let s = sample().expect("Linux has /proc/self");
        assert!(s.resident_bytes > 1_000_000.0, "{s:?}");
        assert!(s.open_fds >= 3.0, "{s:?}");
        let now = crate::model::unix_now() as f64;
        let start = s.start_time_seconds.unwrap();
        assert!(start <= now + 1.0 && start > now - 86_400.0, "{s:?}");
    }
}
