import threading

import pytest
import torch
from cuda.bindings import driver as cu
from helpers import check_call

from gdn_nvrtc import driver
from gdn_nvrtc.reference import make_inputs
from gdn_nvrtc.specs import PREBUILT_SPECS

pytestmark = pytest.mark.gpu


def test_kernel_is_loaded_once_per_process_and_thread_safe():
    spec = PREBUILT_SPECS[3]
    handles = []
    threads = [threading.Thread(target=lambda: handles.append(driver.kernel(spec))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({int(h) for h in handles}) == 1
    assert int(driver.kernel(spec)) == int(handles[0])


def test_driver_errors_name_the_call():
    driver.kernel(PREBUILT_SPECS[0])  # initialises the driver
    result, library = cu.cuLibraryLoadData(driver.load_cubin(PREBUILT_SPECS[0]), None, None, 0, None, None, 0)
    driver.check(result, "cuLibraryLoadData")
    result, _ = cu.cuLibraryGetKernel(library, b"no_such_kernel")
    with pytest.raises(driver.CudaError, match="finding no_such_kernel failed: CUDA_ERROR_NOT_FOUND"):
        driver.check(result, "finding no_such_kernel")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device_than_the_current_one():
    torch.cuda.set_device(0)
    with torch.cuda.device(1):
        inputs = make_inputs(5, 3, 4, 8, pool_size=8, device="cuda:1")
    assert torch.cuda.current_device() == 0
    check_call(inputs, disable_state_update=False)


@pytest.mark.parametrize("programmatic", [True, False])
def test_plain_and_programmatic_launches_agree(monkeypatch, programmatic):
    monkeypatch.setattr(driver, "programmatic_launch", programmatic)
    inputs = make_inputs(5, 4, 4, 8, pool_size=12)
    check_call(inputs, disable_state_update=False)
