//! Each call-out: its argv and options, translated to backend calls. No file, device or mount
//! work happens here, and no storage decision: the backend does it all, idempotently and under
//! the volume's lock (one lock per call: a call that does two steps does them through one
//! `loopvol::Volume` handle).

use std::path::PathBuf;

use loopvol::validate;
use loopvol::{
    Access, AccessMode, CreateVolume, ErrorKind, LockWait, NodeName, Pool, PoolOptions, Publish,
    SizeRequest, Volume, VolumeId,
};

use crate::config::Config;
use crate::options::{Options, VolumeRequest};
use crate::reply::{CallError, Capabilities, Reply};

pub type CallResult = Result<Reply, CallError>;

/// Prefix of the device handle `attach` returns; `waitforattach` turns it into `/dev/loopN`.
pub const HANDLE_PREFIX: &str = "loopvol:";

pub fn capabilities(config: &Config) -> Capabilities {
    Capabilities {
        attach: config.attach,
        selinux_relabel: true,
        supports_metrics: true,
        // We apply the pod's fsGroup ourselves (one chown of the volume root, setgid): kubelet's
        // recursive chown of every file is not needed.
        fs_group: false,
        requires_fs_resize: true,
    }
}

/// The call's arguments after the call name.
pub struct Args<'a> {
    call: &'a str,
    args: &'a [String],
    usage: &'static str,
}

impl<'a> Args<'a> {
    pub fn new(call: &'a str, args: &'a [String], usage: &'static str) -> Self {
        Args { call, args, usage }
    }

    fn get(&self, i: usize, what: &str) -> Result<&'a str, CallError> {
        self.args.get(i).map(String::as_str).ok_or_else(|| {
            CallError::invalid(format!(
                "{} needs {what} (usage: {} {})",
                self.call, self.call, self.usage
            ))
        })
    }

    /// An argument that is not the JSON options: refused, without echoing it, unless it is plain
    /// text (see [`options::is_plain`]); JSON or option text here is a caller's mistake that
    /// must not put secrets into a reply or a log.
    fn plain(&self, i: usize, what: &str) -> Result<&'a str, CallError> {
        let arg = self.get(i, what)?;
        if !crate::options::is_plain(arg) {
            return Err(CallError::invalid(format!(
                "{} needs {what} as argument {} but got {} bytes that are not one (JSON \
                 options, or characters no path or name has; not shown); usage: {} {}",
                self.call,
                i + 1,
                arg.len(),
                self.call,
                self.usage
            )));
        }
        Ok(arg)
    }

    fn options(&self, i: usize) -> Result<Options, CallError> {
        Ok(Options::parse(self.get(i, "the JSON options")?)?)
    }

    /// A path argument: absolute and normalized, not a system directory.
    fn path(&self, i: usize, what: &'static str) -> Result<PathBuf, CallError> {
        let p = PathBuf::from(self.plain(i, what)?);
        validate::check_path(what, &p, &[])?;
        Ok(p)
    }

    fn node(&self, i: usize) -> Result<NodeName, CallError> {
        // The one rule for node names first (its messages never echo the name), then: no JSON
        // or option text, which a misordered call could put here and a message would echo.
        let node = NodeName::parse("node name", self.get(i, "the node name")?)?;
        self.plain(i, "the node name")?;
        Ok(node)
    }
}

/// What a mount or attach call asks of the backend, typed.
struct Request {
    id: VolumeId,
    options: VolumeRequest,
}

impl Request {
    fn parse(options: &Options) -> Result<Request, CallError> {
        let options = VolumeRequest::from_options(options)?;
        Ok(Request {
            id: VolumeId::try_from(options.id.as_str())?,
            options,
        })
    }

    fn access(&self) -> Access {
        Access::Mount {
            fs_type: self.options.fs_type,
            mount_options: self.options.mount_options.clone(),
        }
    }

    /// The volume, created (thin) when it does not exist and a size is given: one backend call,
    /// under the volume's lock. The backend sizes it (whole blocks, the filesystem's minimum)
    /// and records a filesystem only when one is asked for.
    fn open_or_create<'p>(&self, pool: &'p Pool) -> Result<Volume<'p>, CallError> {
        let Some(size) = self.options.size else {
            return pool.find_volume(&self.id)?.ok_or_else(|| {
                CallError::invalid(format!(
                    "volume {:?} not found in pool {}, and no \"size\" option was given to create it",
                    self.id.as_str(),
                    pool.root().display()
                ))
            });
        };
        Ok(pool.open_or_create_volume(&CreateVolume {
            name: self.id.to_string(),
            size: SizeRequest::at_least(size),
            fs_type: self.options.fs_type,
            allocation: None,
            source: None,
        })?)
    }
}

pub struct Driver<'c> {
    pub config: &'c Config,
}

impl Driver<'_> {
    fn pool(&self) -> Result<Pool, CallError> {
        let mut options = PoolOptions::new(self.config.node.clone());
        options.shared = self.config.attach;
        options.lock_wait = LockWait::Bounded(self.config.lock_timeout);
        Ok(Pool::open(&self.config.pool, options)?)
    }

    /// `mount <podVolumeDir> <json>`.
    pub fn mount(&self, a: &Args) -> CallResult {
        let dir = a.path(0, "pod volume dir")?;
        let req = Request::parse(&a.options(1)?)?;
        tracing::info!(volume = %req.id, dir = %dir.display(), "mount");
        // kubelet creates the directory before calling; a missing one means a confused caller.
        if !dir.is_dir() {
            return Err(CallError::invalid(format!(
                "pod volume dir {} does not exist or is not a directory (kubelet creates it before mount)",
                dir.display()
            )));
        }
        let pool = self.pool()?;
        let publish = Publish {
            staging: None,
            target: pool.node_path("pod volume dir", dir)?,
            access: req.access(),
            read_only: req.options.read_only,
            fs_group: req.options.fs_group,
            exclusive: false,
        };
        if self.config.attach {
            // kubelet has run mountdevice: bind from wherever this node has the volume mounted.
            pool.volume(&req.id)?.publish(&publish)?;
            return Ok(Reply::success());
        }
        // Stage (read-write, whatever this pod asks: other pods on the node may write, and a
        // blank volume must be formatted) and publish; the backend undoes what a failure left.
        req.open_or_create(&pool)?.stage_and_publish(&publish)?;
        Ok(Reply::success())
    }

    /// `unmount <podVolumeDir>`.
    pub fn unmount(&self, a: &Args) -> CallResult {
        let dir = a.path(0, "pod volume dir")?;
        let pool = self.pool()?;
        let dir = pool.node_path("pod volume dir", dir)?;
        if self.config.attach {
            // Only the pod's bind: kubelet releases the device mount with unmountdevice.
            match pool.volume_at(&dir)? {
                Some(id) => {
                    tracing::info!(volume = %id, dir = %dir.display(), "unmount");
                    pool.volume(&id)?.unpublish(&dir)?;
                }
                None => tracing::info!(dir = %dir.display(), "unmount: nothing mounted there"),
            }
            return Ok(Reply::success());
        }
        match pool.release_target(&dir)? {
            Some(id) => tracing::info!(volume = %id, dir = %dir.display(), "unmounted"),
            None => tracing::info!(dir = %dir.display(), "unmount: nothing mounted there"),
        }
        Ok(Reply::success())
    }

    /// `expandfs <json> <devicePath> <deviceMountPath> <newSize> <oldSize>`: grows the image, then
    /// the filesystem where this node mounts it.
    pub fn expandfs(&self, a: &Args) -> CallResult {
        let options = a.options(0)?;
        let id = VolumeId::try_from(options.volume_id()?.as_str())?;
        let mount_path = a.plain(2, "the device mount path")?;
        let new_size = a.plain(3, "the new size in bytes")?;
        let new_size: u64 = new_size.parse().map_err(|_| {
            CallError::invalid(format!(
                "the new size must be a number of bytes, not {new_size:?}"
            ))
        })?;
        let mount_path = if mount_path.is_empty() {
            None
        } else {
            Some(a.path(2, "device mount path")?)
        };
        tracing::info!(volume = %id, new_size, "expandfs");
        let pool = self.pool()?;
        // An unknown volume is refused before anything, even a lock file, is made for it.
        let mut volume = pool.volume(&id)?;
        // kubelet passes the device mount path, or the pod's dir; if the volume is not mounted
        // there, grow it wherever this node mounts it.
        let at = match mount_path {
            Some(p) => {
                let p = pool.node_path("device mount path", p)?;
                (pool.volume_at(&p)?.as_ref() == Some(&id)).then_some(p)
            }
            None => None,
        };
        // FlexVolume has no controller expansion: the node grows the image too.
        let device_size = volume.node_expand(at.as_ref(), SizeRequest::at_least(new_size), true)?;
        tracing::info!(volume = %id, device_size, "expanded");
        Ok(Reply::success())
    }

    /// `attach <json> <nodeName>` (controller-manager): claims the volume for the node, creating
    /// it first when absent and `size` is given.
    pub fn attach(&self, a: &Args) -> CallResult {
        let req = Request::parse(&a.options(0)?)?;
        let node = a.node(1)?;
        tracing::info!(volume = %req.id, %node, read_only = req.options.read_only, "attach");
        let pool = self.pool()?;
        req.open_or_create(&pool)?.claim(
            &node,
            AccessMode::single_node(req.options.read_only),
            req.options.pv_name.as_deref(),
        )?;
        Ok(Reply::success().device(format!("{HANDLE_PREFIX}{}", req.id)))
    }

    /// `isattached <json> <nodeName>`: whether the node holds a claim.
    pub fn isattached(&self, a: &Args) -> CallResult {
        let id = VolumeId::try_from(a.options(0)?.volume_id()?.as_str())?;
        let node = a.node(1)?;
        let pool = self.pool()?;
        let attached = match pool.get_volume(&id) {
            Ok(m) => m.claims.iter().any(|h| h.node == node),
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Reply::success().attached(attached))
    }

    /// `detach <pvName> <nodeName>`: releases the node's claim made for that PV. Unknown: done.
    pub fn detach(&self, a: &Args) -> CallResult {
        let pv = a.plain(0, "the volume name")?;
        validate::check_name("volume name", pv)?;
        let node = a.node(1)?;
        let pool = self.pool()?;
        let id = match pool.find_claim_by_pv(pv, &node)? {
            Some(id) => Some(id),
            // A claim made without a PV name (hand-written calls): the name may be the volume ID.
            None => VolumeId::try_from(pv).ok(),
        };
        if let Some(id) = id {
            tracing::info!(volume = %id, pv, %node, "detach");
            if let Some(mut volume) = pool.find_volume(&id)? {
                volume.release(&node)?;
            }
        }
        Ok(Reply::success())
    }

    /// `waitforattach <device> <json>` (kubelet, on the node): attaches the loop device.
    pub fn waitforattach(&self, a: &Args) -> CallResult {
        let handle = a.plain(0, "the device")?;
        let req = Request::parse(&a.options(1)?)?;
        check_handle(handle, &req.id)?;
        let pool = self.pool()?;
        let device = pool.volume(&req.id)?.attach(req.options.read_only)?;
        // The node's record carries its boot: once this node boots again, the controller knows
        // its old holds are stale. Rewritten only when it changes; never fatal.
        if let Err(e) = pool.register_node() {
            tracing::warn!(error = %e, "could not record this node in the pool");
        }
        tracing::info!(volume = %req.id, device = %device.display(), "attached");
        Ok(Reply::success().device(device.display().to_string()))
    }

    /// `mountdevice <deviceMountPath> <device> <json>`: formats if blank and mounts. A failure
    /// releases the loop device (the backend's `stage_or_release`): kubelet never calls
    /// unmountdevice for a path that is not mounted.
    pub fn mountdevice(&self, a: &Args) -> CallResult {
        let path = a.path(0, "device mount path")?;
        let handle = a.plain(1, "the device")?;
        let req = Request::parse(&a.options(2)?)?;
        check_handle(handle, &req.id)?;
        let pool = self.pool()?;
        let path = pool.node_path("device mount path", path)?;
        let staged = pool.volume(&req.id)?.stage_or_release(
            &path,
            &req.access(),
            AccessMode::single_node(req.options.read_only),
        )?;
        tracing::info!(volume = %req.id, path = %path.display(), device = %staged.device.display(), "mounted device");
        Ok(Reply::success())
    }

    /// `unmountdevice <deviceMountPath>`: unmounts and detaches the loop device. Not mounted (a
    /// repeat, or after a reboot): releases this node's hold on the volume kubelet's path names.
    pub fn unmountdevice(&self, a: &Args) -> CallResult {
        let path = a.path(0, "device mount path")?;
        let pool = self.pool()?;
        let path = pool.node_path("device mount path", path)?;
        if let Some(id) = pool.volume_at(&path)? {
            pool.volume(&id)?.unstage(&path)?;
            tracing::info!(volume = %id, path = %path.display(), "unmounted device");
            return Ok(Reply::success());
        }
        // kubelet's device mount path ends in the PV name; after a reboot the mount is gone but
        // the metadata still says this node holds the volume, which would keep other nodes out.
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Ok(Reply::success());
        };
        let id = match pool.find_claim_by_pv(name, &self.config.node)? {
            Some(id) => Some(id),
            None => VolumeId::try_from(name).ok(),
        };
        let Some(id) = id else {
            return Ok(Reply::success());
        };
        match pool
            .find_volume(&id)
            .and_then(|v| v.map(|mut v| v.detach()).transpose())
        {
            Ok(Some(())) => {
                tracing::info!(volume = %id, path = %path.display(), "not mounted; released this node's hold")
            }
            Ok(None) => {}
            // The device mount path is not mounted, which is all this call promises.
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "not mounted; could not release this node's hold")
            }
        }
        Ok(Reply::success())
    }
}

/// A device argument from `attach` must name the same volume as the options.
fn check_handle(handle: &str, id: &VolumeId) -> Result<(), CallError> {
    match handle.strip_prefix(HANDLE_PREFIX) {
        Some(h) if h != id.as_str() => Err(CallError::invalid(format!(
            "device {handle:?} is volume {h:?} but the options name volume {:?}",
            id.as_str()
        ))),
        _ => Ok(()),
    }
}

/// Whether `path` is usable as given (for tests of argument handling).
#[cfg(test)]
fn path_ok(p: &str) -> bool {
    validate::check_path("p", std::path::Path::new(p), &[]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        let v1 = VolumeId::try_from("v1").unwrap();
        check_handle("loopvol:v1", &v1).unwrap();
        check_handle("/dev/loop3", &v1).unwrap();
        let err = check_handle("loopvol:v2", &v1).unwrap_err().to_string();
        assert!(err.contains("v2") && err.contains("v1"), "{err}");
    }

    #[test]
    fn args_are_checked() {
        let argv = vec!["rel/dir".to_owned()];
        let a = Args::new("mount", &argv, "<podVolumeDir> <json>");
        let err = a.path(0, "pod volume dir").unwrap_err().to_string();
        assert!(err.contains("not absolute"), "{err}");
        let err = a.options(1).unwrap_err().to_string();
        assert!(err.contains("mount needs the JSON options"), "{err}");
        assert!(path_ok("/var/lib/kubelet/pods/x"));
        assert!(!path_ok("/var/lib/../etc"));
    }

    /// An attach-mode driver on a temporary pool: `attach` creates and claims without touching
    /// the kernel, so the translation to the backend's policy is checked without root.
    fn attach_mode(pool: &std::path::Path) -> Config {
        Config {
            attach: true,
            pool: pool.to_owned(),
            log: None,
            node: NodeName::try_from("node-a").unwrap(),
            lock_timeout: std::time::Duration::from_secs(5),
            call_timeout: std::time::Duration::from_secs(60),
        }
    }

    fn attach(config: &Config, options: &str, node: &str) -> CallResult {
        let argv = vec![options.to_owned(), node.to_owned()];
        Driver { config }.attach(&Args::new("attach", &argv, "<json> <nodeName>"))
    }

    fn recorded(pool: &std::path::Path, id: &str) -> serde_json::Value {
        let path = pool.join("volumes").join(id).join("volume.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// `size` follows the backend's rules (whole blocks, the filesystem's minimum), and no
    /// filesystem is recorded unless one is asked for: the first format fixes it.
    #[test]
    fn created_volumes_follow_the_backend_policy() {
        let dir = tempfile::tempdir().unwrap();
        let config = attach_mode(dir.path());
        // (options, volume) → (size, recorded fs)
        let table = [
            (r#"{"volumeID":"tiny","size":"1000"}"#, "tiny", 4096, None),
            (
                r#"{"volumeID":"small-xfs","size":"64Mi","kubernetes.io/fsType":"xfs"}"#,
                "small-xfs",
                300 << 20,
                Some("xfs"),
            ),
            (
                r#"{"volumeID":"no-fs","size":"1Gi"}"#,
                "no-fs",
                1 << 30,
                None,
            ),
            (
                r#"{"volumeID":"no-fs-either","size":"1Gi","kubernetes.io/fsType":""}"#,
                "no-fs-either",
                1 << 30,
                None,
            ),
        ];
        for (options, id, size, fs) in table {
            let reply = attach(&config, options, "node-a").unwrap();
            assert_eq!(reply.device.as_deref(), Some(&*format!("loopvol:{id}")));
            let meta = recorded(dir.path(), id);
            assert_eq!(meta["size_bytes"], size, "{id}: {meta}");
            assert_eq!(meta["fs_type"].as_str(), fs, "{id}: {meta}");
            assert_eq!(meta["claims"][0]["node"], "node-a", "{id}: {meta}");
        }
        // An existing volume is used as it is, whatever `size` says now.
        attach(&config, r#"{"volumeID":"tiny","size":"1Gi"}"#, "node-a").unwrap();
        assert_eq!(recorded(dir.path(), "tiny")["size_bytes"], 4096);
    }

    /// Node names in argv follow the one rule of every front end.
    #[test]
    fn node_names_follow_the_one_rule() {
        let dir = tempfile::tempdir().unwrap();
        let config = attach_mode(dir.path());
        let options = r#"{"volumeID":"v","size":"1Mi","kubernetes.io/readwrite":"ro"}"#;
        for ok in ["node-b", &"n".repeat(200), "worker.example.com"] {
            attach(&config, options, ok).unwrap();
        }
        for bad in ["", "a\nb", &"n".repeat(257)] {
            let err = attach(&config, options, bad).unwrap_err().to_string();
            assert!(err.contains("invalid node name"), "{bad:?}: {err}");
        }
    }
}
