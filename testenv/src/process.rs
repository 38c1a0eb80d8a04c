//! Child processes of the test environment, and how they end.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the environment's processes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Die with this process (tests): `PR_SET_PDEATHSIG` = SIGKILL.
    TiedToThisProcess,
    /// Outlive it, in a session of their own (`make env`).
    Detached,
}

/// One started process.
#[derive(Debug)]
pub struct ManagedProcess {
    /// Short name (etcd, kube-apiserver, …).
    pub name: String,
    /// The binary.
    pub binary: PathBuf,
    child: Option<Child>,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process. Test
/// threads come and go, so tied children are forked from one thread that lives as long as the process.
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the testenv spawner thread");
        tx
    })
}

impl ManagedProcess {
    /// Starts `bin args…` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, bin: &Path, args: &[String], log: &Path, lifetime: Lifetime) -> std::io::Result<Self> {
        Self::spawn_with_env(name, bin, args, &[], log, lifetime)
    }

    /// Like [`ManagedProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        lifetime: Lifetime,
    ) -> std::io::Result<Self> {
        Self::spawn_in(name, bin, args, env, log, lifetime, None)
    }

    /// Like [`ManagedProcess::spawn_with_env`], in the network namespace open as `netns` (a file
    /// descriptor of `/run/netns/<name>`, open for as long as this call runs) when one is given.
    pub fn spawn_in(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        lifetime: Lifetime,
        netns: Option<std::os::fd::RawFd>,
    ) -> std::io::Result<Self> {
        let out = File::options().create(true).append(true).open(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (setns, setsid, prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The spawner thread may be in another network namespace than the caller.
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Own session: Ctrl-C at a terminal reaches the test runner, which then ends us
                // itself (or, if it dies, the death signal does) instead of half the environment.
                libc::setsid();
                if lifetime == Lifetime::TiedToThisProcess {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The parent may have died between fork and prctl.
                    if libc::getppid() as u32 != parent {
                        libc::_exit(1);
                    }
                }
                Ok(())
            });
        }
        let child = match lifetime {
            Lifetime::Detached => cmd.spawn()?,
            Lifetime::TiedToThisProcess => {
                let (tx, rx) = mpsc::channel();
                spawner().send((cmd, tx)).map_err(|_| std::io::Error::other("the testenv spawner thread is gone"))?;
                rx.recv().map_err(|_| std::io::Error::other("the testenv spawner thread is gone"))??
            }
        };
        Ok(ManagedProcess { name: name.into(), binary: bin.to_path_buf(), child: Some(child) })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The exit status, if it has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps the child.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGKILL at once (tests that crash a component).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Lets the process run on without this handle.
    pub fn forget(mut self) {
        self.child.take();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Reads `pid name binary` lines.
pub(crate) fn read_pid_file(path: &Path) -> Vec<(u32, String, PathBuf)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            Some((parts.next()?.parse().ok()?, parts.next()?.to_string(), PathBuf::from(parts.next()?)))
        })
        .collect()
}

/// Whether `pid` is alive and still runs `binary` (a recycled pid is not ours).
pub(crate) fn is_alive(pid: u32, binary: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true);
    !zombie && (exe == binary || std::fs::canonicalize(binary).is_ok_and(|b| b == exe))
}

/// SIGTERM, wait up to `grace`, then SIGKILL a process that is not our child.
pub(crate) fn terminate(pid: u32, binary: &Path, grace: Duration) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(pid, binary) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(pid, binary) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}
