//! The memory a `memory_limiter` percentage is taken of: the cgroup's limit (v2 `memory.max`,
//! v1 `memory.limit_in_bytes`) when there is one, else the machine's total, as the collector.
use std::path::Path;
use std::sync::OnceLock;

/// The memory available to this process, read once; None when nothing could be read.
pub(crate) fn available_bytes() -> Option<u64> {
    static CACHED: OnceLock<Option<u64>> = OnceLock::new();
    *CACHED.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        available_in(
            Path::new("/sys/fs/cgroup"),
            &read("/proc/self/cgroup"),
            &read("/proc/meminfo"),
        )
    })
}

/// `cgroup_root` is where cgroup filesystems are mounted, `self_cgroup` the text of
/// /proc/self/cgroup and `meminfo` of /proc/meminfo.
fn available_in(cgroup_root: &Path, self_cgroup: &str, meminfo: &str) -> Option<u64> {
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024);
    let limit = cgroup_limit(cgroup_root, self_cgroup);
    match (limit, total) {
        (Some(l), Some(t)) => Some(l.min(t)),
        (l, t) => l.or(t),
    }
}

fn cgroup_limit(root: &Path, self_cgroup: &str) -> Option<u64> {
    let mut candidates = Vec::new();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(path).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(path).join("memory.limit_in_bytes"));
        }
    }
    // In a container the cgroup path seen from inside is often not mounted under it: the
    // namespace root is.
    candidates.push(root.join("memory.max"));
    candidates.push(root.join("memory/memory.limit_in_bytes"));
    candidates.into_iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        let v = text.trim().parse::<u64>().ok()?;
        // "max" (v2) does not parse; v1 says "no limit" with a value near i64::MAX.
        (v < 1 << 60).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:  1 kB\n";

    #[test]
    fn cgroup_v2_limit_of_the_process_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kubepods/pod1")).unwrap();
        std::fs::write(dir.path().join("kubepods/pod1/memory.max"), "536870912\n").unwrap();
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(
            available_in(dir.path(), "0::/kubepods/pod1\n", MEMINFO),
            Some(536_870_912)
        );
        // Unlimited: the machine's total.
        assert_eq!(available_in(dir.path(), "0::/\n", MEMINFO), Some(8_000_000 * 1024));
    }

    #[test]
    fn cgroup_v1_limit_and_its_unlimited_value() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("memory/docker/abc");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        let self_cgroup = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n";
        assert_eq!(available_in(dir.path(), self_cgroup, MEMINFO), Some(1 << 30));
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(available_in(dir.path(), self_cgroup, MEMINFO), Some(8_000_000 * 1024));
        // A limit above the machine's memory is the machine's memory.
        std::fs::write(mem.join("memory.limit_in_bytes"), "99999999999999\n").unwrap();
        assert_eq!(available_in(dir.path(), self_cgroup, MEMINFO), Some(8_000_000 * 1024));
        assert_eq!(available_in(dir.path(), "", ""), None);
    }
}
