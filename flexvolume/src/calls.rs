//! Each call-out: its argv and options, translated to backend calls. No file, device or mount
//! work happens here; the backend does it all, idempotently and under the volume's lock.

use std::path::{Path, PathBuf};

use loopvol::validate;
use loopvol::{
    Access, AccessMode, Allocation, CreateVolume, ErrorKind, LockWait, Pool, PoolOptions,
};

use crate::config::Config;
use crate::options::{Options, VolumeRequest};
use crate::reply::{CallError, Capabilities, Reply};

pub type CallResult = Result<Reply, CallError>;

/// Prefix of the device handle `attach` returns; `waitforattach` turns it into `/dev/loopN`.
pub const HANDLE_PREFIX: &str = "loopvol:";

/// How often node-mode `mount` stages and publishes before giving up on a concurrent unmount.
const MOUNT_ATTEMPTS: u32 = 3;

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

    fn options(&self, i: usize) -> Result<Options, CallError> {
        Ok(Options::parse(self.get(i, "the JSON options")?)?)
    }

    /// A path argument: absolute and normalized, not a system directory.
    fn path(&self, i: usize, what: &'static str) -> Result<PathBuf, CallError> {
        let p = PathBuf::from(self.get(i, what)?);
        validate::check_path(what, &p, &[])?;
        Ok(p)
    }

    fn node(&self, i: usize) -> Result<&'a str, CallError> {
        let node = self.get(i, "the node name")?;
        validate::check_name("node name", node)?;
        Ok(node)
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

    /// The volume of `req`, created (thin) when it does not exist and a size is given.
    fn ensure_volume(&self, pool: &Pool, req: &VolumeRequest) -> Result<(), CallError> {
        match pool.get_volume(&req.id) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let Some(size) = req.size else {
                    return Err(CallError::invalid(format!(
                        "volume {:?} not found in pool {}, and no \"size\" option was given to create it",
                        req.id,
                        pool.root().display()
                    )));
                };
                pool.create_volume(&CreateVolume {
                    name: req.id.clone(),
                    size_bytes: size,
                    fs_type: Some(req.fs_type.unwrap_or(loopvol::FsType::Ext4)),
                    allocation: Allocation::Thin,
                    source: None,
                })?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn access(req: &VolumeRequest) -> Access {
        Access::Mount {
            fs_type: req.fs_type,
            mount_options: req.mount_options.clone(),
        }
    }

    fn mode(read_only: bool) -> AccessMode {
        if read_only {
            AccessMode::ReadOnly
        } else {
            AccessMode::SingleNodeWriter
        }
    }

    /// `mount <podVolumeDir> <json>`.
    pub fn mount(&self, a: &Args) -> CallResult {
        let dir = a.path(0, "pod volume dir")?;
        let req = VolumeRequest::from_options(&a.options(1)?)?;
        tracing::info!(volume = %req.id, dir = %dir.display(), "mount");
        // kubelet creates the directory before calling; a missing one means a confused caller.
        if !dir.is_dir() {
            return Err(CallError::invalid(format!(
                "pod volume dir {} does not exist or is not a directory (kubelet creates it before mount)",
                dir.display()
            )));
        }
        let pool = self.pool()?;
        let access = Self::access(&req);
        if self.config.attach {
            // kubelet has run mountdevice: bind from wherever this node has the volume mounted.
            pool.publish(&req.id, None, &dir, &access, req.read_only, req.fs_group)?;
            return Ok(Reply::success());
        }
        self.ensure_volume(&pool, &req)?;
        let staging = pool.default_staging_path(&req.id)?;
        let result = Self::stage_and_publish(&pool, &req, &staging, &dir, &access);
        if let Err(e) = &result {
            // Leave no orphan: a failed mount is never unmounted by kubelet (it never counted as
            // mounted), so a loop device or staging mount this call made would stay forever.
            // Release them when no other pod uses them. Not after a lock timeout: that would
            // wait again, and whoever holds the lock owns the volume's state.
            if e.kind() != ErrorKind::Busy {
                match pool.release_staging_if_unused(&req.id) {
                    Ok(released) => {
                        tracing::info!(volume = %req.id, released, "mount failed; released what no pod uses")
                    }
                    Err(undo) => {
                        tracing::warn!(volume = %req.id, error = %undo, "mount failed; could not release the staging mount")
                    }
                }
            }
        }
        result?;
        Ok(Reply::success())
    }

    /// Stages the volume (read-write whatever this pod asks: other pods on the node may write,
    /// and a blank volume must be formatted) and binds it into `dir`, read-only when asked.
    fn stage_and_publish(
        pool: &Pool,
        req: &VolumeRequest,
        staging: &Path,
        dir: &Path,
        access: &Access,
    ) -> loopvol::Result<()> {
        // A concurrent unmount of the volume's last other pod may release the staging mount
        // between our stage and publish (publish then says it is not staged): stage again.
        let mut attempt = 1;
        loop {
            pool.stage(&req.id, staging, access, false)?;
            match pool.publish(
                &req.id,
                Some(staging),
                dir,
                access,
                req.read_only,
                req.fs_group,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::FailedPrecondition && attempt < MOUNT_ATTEMPTS => {
                    tracing::info!(volume = %req.id, error = %e, "staging released meanwhile; staging again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `unmount <podVolumeDir>`.
    pub fn unmount(&self, a: &Args) -> CallResult {
        let dir = a.path(0, "pod volume dir")?;
        let pool = self.pool()?;
        if self.config.attach {
            // Only the pod's bind: kubelet releases the device mount with unmountdevice.
            match pool.volume_at(&dir)? {
                Some(id) => {
                    tracing::info!(volume = %id, dir = %dir.display(), "unmount");
                    pool.unpublish(&id, &dir)?;
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
        let id = options.volume_id()?;
        let mount_path = a.get(2, "the device mount path")?;
        let new_size = a.get(3, "the new size in bytes")?;
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
        // kubelet passes the device mount path, or the pod's dir; if the volume is not mounted
        // there, grow it wherever this node mounts it. (An unknown volume is refused before
        // anything, even a lock file, is made for it.)
        let at = match mount_path {
            Some(p) if pool.volume_at(&p)?.as_deref() == Some(id.as_str()) => Some(p),
            _ => None,
        };
        let device_size = pool.node_expand_to(&id, at.as_deref(), new_size)?;
        tracing::info!(volume = %id, device_size, "expanded");
        Ok(Reply::success())
    }

    /// `attach <json> <nodeName>` (controller-manager): claims the volume for the node, creating
    /// it first when absent and `size` is given.
    pub fn attach(&self, a: &Args) -> CallResult {
        let req = VolumeRequest::from_options(&a.options(0)?)?;
        let node = a.node(1)?;
        tracing::info!(volume = %req.id, node, read_only = req.read_only, "attach");
        let pool = self.pool()?;
        self.ensure_volume(&pool, &req)?;
        pool.claim(
            &req.id,
            node,
            Self::mode(req.read_only),
            req.pv_name.as_deref(),
        )?;
        Ok(Reply::success().device(format!("{HANDLE_PREFIX}{}", req.id)))
    }

    /// `isattached <json> <nodeName>`: whether the node holds a claim.
    pub fn isattached(&self, a: &Args) -> CallResult {
        let id = a.options(0)?.volume_id()?;
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
        let pv = a.get(0, "the volume name")?;
        validate::check_name("volume name", pv)?;
        let node = a.node(1)?;
        let pool = self.pool()?;
        let id = match pool.find_claim_by_pv(pv, node)? {
            Some(id) => Some(id),
            // A claim made without a PV name (hand-written calls): the name may be the volume ID.
            None => validate::check_id("volume ID", pv)
                .is_ok()
                .then(|| pv.to_owned()),
        };
        if let Some(id) = id {
            tracing::info!(volume = %id, pv, node, "detach");
            pool.release_claim(&id, node)?;
        }
        Ok(Reply::success())
    }

    /// `waitforattach <device> <json>` (kubelet, on the node): attaches the loop device.
    pub fn waitforattach(&self, a: &Args) -> CallResult {
        let handle = a.get(0, "the device")?;
        let req = VolumeRequest::from_options(&a.options(1)?)?;
        check_handle(handle, &req.id)?;
        let pool = self.pool()?;
        let device = pool.attach_volume(&req.id, req.read_only)?;
        tracing::info!(volume = %req.id, device = %device.display(), "attached");
        Ok(Reply::success().device(device.display().to_string()))
    }

    /// `mountdevice <deviceMountPath> <device> <json>`: formats if blank and mounts.
    pub fn mountdevice(&self, a: &Args) -> CallResult {
        let path = a.path(0, "device mount path")?;
        let handle = a.get(1, "the device")?;
        let req = VolumeRequest::from_options(&a.options(2)?)?;
        check_handle(handle, &req.id)?;
        let pool = self.pool()?;
        let staged = match pool.stage(&req.id, &path, &Self::access(&req), req.read_only) {
            Ok(staged) => staged,
            Err(e) => {
                // kubelet never calls unmountdevice for a path that is not mounted, and retries
                // waitforattach before the next mountdevice: a loop device left attached here
                // would outlive the pod. Detach it when nothing mounts it (never after a lock
                // timeout: the lock's holder owns the volume's state).
                if e.kind() != ErrorKind::Busy && pool.volume_at(&path).ok().flatten().is_none() {
                    match pool.detach_volume(&req.id) {
                        Ok(()) => {
                            tracing::info!(volume = %req.id, "mountdevice failed; detached the loop device")
                        }
                        Err(undo) => {
                            tracing::info!(volume = %req.id, error = %undo, "mountdevice failed; loop device left attached")
                        }
                    }
                }
                return Err(e.into());
            }
        };
        tracing::info!(volume = %req.id, path = %path.display(), device = %staged.device.display(), "mounted device");
        Ok(Reply::success())
    }

    /// `unmountdevice <deviceMountPath>`: unmounts and detaches the loop device. Not mounted (a
    /// repeat, or after a reboot): releases this node's hold on the volume kubelet's path names.
    pub fn unmountdevice(&self, a: &Args) -> CallResult {
        let path = a.path(0, "device mount path")?;
        let pool = self.pool()?;
        if let Some(id) = pool.volume_at(&path)? {
            pool.unstage(&id, &path)?;
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
            None => validate::check_id("volume ID", name)
                .is_ok()
                .then(|| name.to_owned()),
        };
        if let Some(id) = id {
            match pool.detach_volume(&id) {
                Ok(()) => {
                    tracing::info!(volume = %id, path = %path.display(), "not mounted; released this node's hold")
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                // The device mount path is not mounted, which is all this call promises.
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "not mounted; could not release this node's hold")
                }
            }
        }
        Ok(Reply::success())
    }
}

/// A device argument from `attach` must name the same volume as the options.
fn check_handle(handle: &str, id: &str) -> Result<(), CallError> {
    match handle.strip_prefix(HANDLE_PREFIX) {
        Some(h) if h != id => Err(CallError::invalid(format!(
            "device {handle:?} is volume {h:?} but the options name volume {id:?}"
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
        check_handle("loopvol:v1", "v1").unwrap();
        check_handle("/dev/loop3", "v1").unwrap();
        let err = check_handle("loopvol:v2", "v1").unwrap_err().to_string();
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
}
