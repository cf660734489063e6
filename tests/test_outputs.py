import json
import platform
import re
from pathlib import Path

import pytest
import torch

from cacheaug.outputs import write_json


def test_result_files_record_the_cpu_they_were_computed_on(tmp_path):
    # results from two VMs of one kind differ after training (float rounding): the file must say which CPU it was
    machine = json.loads(write_json(tmp_path / "r.json", {"x": 1}, command="cmd").read_text())["provenance"]["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    found = re.search(r"^model name\s*:\s*(.+?)\s*$", cpuinfo.read_text(), flags=re.MULTILINE)
    # no "model name" line (some ARM kernels): the fallback is platform's processor string
    assert machine["cpu_model"] == (found.group(1) if found else platform.processor() or None)
