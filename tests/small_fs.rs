//! A small filesystem of the test's own (an ext4 image on a loop device, mounted under the
//! scratch dir), for what needs a filesystem the test can fill: a pool that is full.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::kernel::LoopDevice;
use crate::scratch::Scratch;

/// An ext4 filesystem of `size` bytes mounted at `<scratch>/<name>`; unmounted and detached on
/// drop (the scratch dir's own cleanup would do it too, after a failed assertion).
pub struct SmallFs {
    mount: PathBuf,
    dev: LoopDevice,
}

impl SmallFs {
    pub fn ext4(scratch: &Scratch, name: &str, size: u64) -> SmallFs {
        let image = scratch.path(&format!("{name}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        // 4 KiB blocks: loopvol's loop devices have 4 KiB sectors; no blocks reserved for root.
        let (code, _, err) = crate::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-m", "0", "-b", "4096"])
                .arg(&image),
        );
        assert_eq!(code, 0, "mkfs.ext4 {}: {err}", image.display());
        let dev = loopvol::testing::loopdev::attach(&image, false).expect("attach the image");
        let mount = scratch.path(name);
        std::fs::create_dir_all(&mount).unwrap();
        loopvol::testing::mount::mount_fs(
            &dev.path(),
            &mount,
            "ext4",
            nix::mount::MsFlags::empty(),
            "",
        )
        .expect("mount the small filesystem");
        SmallFs { mount, dev }
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Fills the filesystem (a file `filler`), until a 64 KiB file no longer fits.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.mount.join("filler")).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..4096]).is_ok() {}
        let _ = f.sync_all();
        drop(f);
        assert!(
            std::fs::write(self.mount.join("more"), vec![0u8; 1 << 16]).is_err(),
            "{} is not full",
            self.mount.display()
        );
        let _ = std::fs::remove_file(self.mount.join("more"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = loopvol::testing::mount::unmount(&self.mount);
        let _ = loopvol::testing::loopdev::detach(&self.dev);
    }
}
