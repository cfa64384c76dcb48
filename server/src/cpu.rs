//! How busy the machine's cores are: this process's CPU time (every thread,
//! user and system) against wall time, lap by lap.

use std::time::{Duration, Instant};

/// Measures the share of all cores the process used between two laps.
#[derive(Debug)]
pub struct CpuMeter {
    wall: Instant,
    cpu: Option<Duration>,
    cores: usize,
}

impl CpuMeter {
    /// Starts the first lap now.
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu_time(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The share of all cores used since the previous lap (0 to 1), and a
    /// new lap from now. None where the platform does not report CPU time.
    ///
    /// ```
    /// let mut meter = fedveil_server::cpu::CpuMeter::start();
    /// let busy = meter.lap();
    /// assert!(busy.is_none_or(|b| (0.0..=1.0).contains(&b)));
    /// ```
    pub fn lap(&mut self) -> Option<f64> {
        let (wall, cpu) = (Instant::now(), process_cpu_time());
        let elapsed = wall.duration_since(self.wall).as_secs_f64();
        let used = cpu?.checked_sub(self.cpu?)?.as_secs_f64();
        (self.wall, self.cpu) = (wall, cpu);
        (elapsed > 0.0).then(|| (used / (elapsed * self.cores as f64)).clamp(0.0, 1.0))
    }
}

/// User and system CPU time of every thread of this process so far.
#[cfg(unix)]
fn process_cpu_time() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it is given,
    // which points at a zeroed rusage owned by this frame.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let time = |t: libc::timeval| -> Option<Duration> {
        let micros = u32::try_from(t.tv_usec).ok().filter(|&us| us < 1_000_000)?;
        Some(Duration::new(u64::try_from(t.tv_sec).ok()?, micros * 1000))
    };
    Some(time(usage.ru_utime)? + time(usage.ru_stime)?)
}

#[cfg(not(unix))]
fn process_cpu_time() -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_shows_as_busy_and_sleeping_as_idle() {
        let mut meter = CpuMeter::start();
        std::thread::sleep(Duration::from_millis(200));
        let idle = meter.lap().expect("unix reports CPU time");
        let until = Instant::now() + Duration::from_millis(300);
        let mut spins = 0u64;
        while Instant::now() < until {
            spins = std::hint::black_box(spins + 1);
        }
        let busy = meter.lap().expect("unix reports CPU time");
        let one_core = 1.0 / meter.cores as f64;
        assert!(idle < one_core * 0.5, "sleeping: {idle}");
        assert!(busy > one_core * 0.5, "spinning one thread: {busy}");
    }
}
