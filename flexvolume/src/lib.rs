//! `loopvol_flexvolume`: what the FlexVolume driver shares with other crates. The driver binary
//! (`src/main.rs`) and `loopvol-migrate` both read a PV's FlexVolume options through
//! [`options`], so the rule that names a volume ("`volumeID`, else
//! `kubernetes.io/pvOrVolumeName`") exists once: a migrated PV points at the very volume the
//! driver used.

pub mod options;
