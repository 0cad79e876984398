"""Boot management in the manner of blsforme: GPT and superblock probing, ESP targets, Type 1 entries.

``sync_boot(root, esp=...)`` makes the ESP boot every state still on disk (newest five); ``boot_status`` reports
how the ESP and the states disagree.
"""
from pathlib import Path

from reference_impl.boot.esp import DirectoryEsp, EspError, EspFullError, EspMissingError, EspNotFatError, \
    EspTarget, MtoolsEsp
from reference_impl.boot.sync import BootStatus, EspLocation, SyncReport, boot_status, resolve_esp, sync_boot

# The initramfs hook honouring moss.fstx= (POSIX sh, busybox); copy it into an initrd as a pre-switch_root hook.
INITRD_FSTX_SCRIPT = Path(__file__).with_name("initrd") / "stonelab-fstx.sh"

__all__ = ["INITRD_FSTX_SCRIPT", "BootStatus", "DirectoryEsp", "EspError", "EspFullError", "EspLocation",
           "EspMissingError", "EspNotFatError", "EspTarget", "MtoolsEsp", "SyncReport", "boot_status", "resolve_esp",
           "sync_boot"]
