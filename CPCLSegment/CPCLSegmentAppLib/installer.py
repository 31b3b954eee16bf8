"""The installers Slicer provides for the packages the module needs: PyTorch through the PyTorch extension, the
others through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or ``slicer.util.pip_install``. What to install and
when to ask are ``CPCLSegmentModuleLib.environment.ensure_dependencies``'s decisions (tested without Slicer)."""

from __future__ import annotations

from typing import List

import slicer

from CPCLSegmentModuleLib import environment


class SlicerInstaller(environment.Installer):
    """PyTorch through the PyTorch extension; the other packages through ``slicer.packaging.pip_ensure``
    (Slicer >= 5.12) or ``slicer.util.pip_install`` (torch never as another package's dependency)."""

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, "CPCLSegment: install")

    def install_torch(self, requirement: str) -> bool:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise environment.DependencyError("CPCLSegment needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                              "Manager, restart Slicer, and try again.") from None
        # installTorch imports torch here once it is installed (PyTorchUtils does); no CUDA call is made.
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is not None

    def install_packages(self, requirements: List[str], ask: bool) -> None:
        try:
            import slicer.packaging as packaging  # Slicer >= 5.12
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # raises RuntimeError when the user declines (environment.ensure_dependencies reports it)
            # skip_in_testing=False: pip_ensure skips every install in testing mode by default, where the module's own
            # self-test (CPCLSegmentTest, run with --testing) needs the packages it is about to import
            packaging.pip_ensure(requirements, skip_packages=environment.SKIP_PACKAGES, prompt_install=ask, requester="CPCLSegment",
                                 skip_in_testing=False)
            return
        if ask and not self.confirm("CPCLSegment needs these Python packages: " + ", ".join(requirements) + ".\n\nInstall them now?"):
            raise environment.DependencyError("the Python packages " + ", ".join(requirements) + " were not installed (declined)")
        others = [r for r in requirements if not r.lower().startswith("monai")]
        if others:
            slicer.util.pip_install(others)
        for r in requirements:
            if r.lower().startswith("monai"):
                # --no-deps: MONAI's own requirements are torch (from the PyTorch extension) and numpy (in Slicer)
                slicer.util.pip_install([r, "--no-deps"])
