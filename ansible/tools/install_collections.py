"""Install the Ansible collections the playbooks use, without Ansible Galaxy.

Galaxy may be unreachable (it is from CI here), but PyPI is not, and the ``ansible``
package on PyPI bundles the community collections. Installing that whole bundle costs
~55 MB and tens of thousands of files; the playbooks need four collections, so this
downloads the pinned bundle wheel once and unpacks only those into an
``ansible_collections`` tree (the layout ``collections_path`` expects).

Usage: python install_collections.py DEST_DIR
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The bundle release whose collections match ansible-core 2.19 (ansible 12.x).
BUNDLE = "ansible==12.3.0"
COLLECTIONS = (
    "community/general",  # ufw; the chroot connection of make deploy-test
    "ansible/posix",  # (community.general's declared companion; small)
    "google/cloud",  # gcp.yml
    "community/docker",  # the nsenter connection of make deploy-test-boot
)


def main(dest: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, BUNDLE],
            check=True,
        )
        wheel = next(Path(tmp).glob("ansible-*.whl"))
        root = dest / "ansible_collections"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                parts = name.split("/")
                if len(parts) < 4 or parts[0] != "ansible_collections":
                    continue
                if "/".join(parts[1:3]) not in COLLECTIONS:
                    continue
                target = root.joinpath(*parts[1:])
                if name.endswith("/"):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    found = sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/MANIFEST.json"))
    print(f"collections from {BUNDLE} in {root}: {', '.join(found)}")
    return 0 if len(found) == len(COLLECTIONS) else 1


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
