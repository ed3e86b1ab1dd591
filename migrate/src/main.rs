//! `loopvol-migrate`: reads loopvol FlexVolume PersistentVolumes (YAML or JSON) and writes the
//! equivalent CSI PersistentVolumes, for the migration described in deploy/README.md
//! ("Migrating from FlexVolume to CSI").
//!
//! ```text
//! kubectl get pv data-web-0 -o yaml | loopvol-migrate --node worker-2 > data-web-0.csi.yaml
//! ```

mod convert;
mod yaml;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use convert::{Format, Pool, Settings};

/// Converts loopvol FlexVolume PersistentVolumes into the equivalent CSI PersistentVolumes.
///
/// Reads PVs as `kubectl get pv NAME... -o yaml` (or `-o json`) prints them: one PV, several
/// YAML documents, or a List. Writes CSI PVs with the same name, capacity, access modes,
/// claimRef, reclaim policy, storage class, volume mode and mount options, and
/// `spec.csi.volumeHandle` = the volume ID the FlexVolume driver used (options.volumeID, else the
/// PV name). Objects that are not PVs are skipped; any PV that is not a loopvol FlexVolume PV
/// refuses the whole input. Notes go to standard error.
///
/// A PV's volume source cannot be changed in place: see deploy/README.md for the procedure
/// (Retain, delete the old PV, create the new one; the claim binds again).
#[derive(Debug, Parser)]
#[command(name = "loopvol-migrate", version)]
struct Args {
    /// The FlexVolume PV(s), YAML or JSON; "-" or nothing: standard input.
    file: Option<PathBuf>,

    /// The node whose pool holds the volumes (node-local pools): the new PVs get node affinity
    /// to it. Its Kubernetes node name, as loopvol-csi's --node-id there.
    #[arg(long, value_name = "NODE", required_unless_present = "shared_pool")]
    node: Option<String>,

    /// The pool is on a filesystem every node mounts (loopvol-csi --shared-pool): no node
    /// affinity.
    #[arg(long, conflicts_with = "node")]
    shared_pool: bool,

    /// The CSI driver's name (its CSIDriver object, loopvol-csi --driver-name).
    #[arg(long, default_value = convert::DEFAULT_CSI_DRIVER)]
    driver_name: String,

    /// Output format: YAML (one document per PV) or JSON (one object, or a List).
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Yaml)]
    output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Yaml,
    Json,
}

fn read_input(file: Option<&PathBuf>) -> Result<String, String> {
    match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            Ok(text)
        }
    }
}

fn run(args: Args) -> Result<String, String> {
    let settings = Settings {
        driver_name: args.driver_name,
        pool: match args.node {
            Some(node) => Pool::Node(node),
            None => Pool::Shared,
        },
    };
    let text = read_input(args.file.as_ref())?;
    let docs = convert::read_documents(&text).map_err(|e| e.to_string())?;
    let converted = convert::convert(&docs, &settings).map_err(|e| e.to_string())?;
    for note in &converted.notes {
        eprintln!("loopvol-migrate: note: {note}");
    }
    let format = match args.output {
        OutputFormat::Yaml => Format::Yaml,
        OutputFormat::Json => Format::Json,
    };
    Ok(convert::render(&converted.pvs, format))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loopvol-migrate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli() {
        let a = Args::try_parse_from(["loopvol-migrate", "--node", "n1", "pv.yaml"]).unwrap();
        assert_eq!(a.node.as_deref(), Some("n1"));
        assert_eq!(a.driver_name, "csi.loopvol.io");
        assert_eq!(a.output, OutputFormat::Yaml);
        let a = Args::try_parse_from(["loopvol-migrate", "--shared-pool", "-o", "json"]).unwrap();
        assert!(a.shared_pool && a.node.is_none() && a.file.is_none());
        assert_eq!(a.output, OutputFormat::Json);
        // Node-local is the default layout: a node must be named, unless the pool is shared.
        assert!(Args::try_parse_from(["loopvol-migrate", "pv.yaml"]).is_err());
        assert!(Args::try_parse_from(["loopvol-migrate", "--node", "n", "--shared-pool"]).is_err());
        assert!(Args::try_parse_from(["loopvol-migrate", "--node", "n", "-o", "toml"]).is_err());
    }
}
