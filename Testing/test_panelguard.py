"""What the panel holds back or asks first (``CPCLSegmentModuleLib.panelguard``): pure decisions, no Qt, no Slicer."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentModuleLib import panelguard  # noqa: E402


class SpinBox:
    """A QDoubleSpinBox's text, as Qt handles it: writing a value reformats the text ("%.3f") and puts the cursor at
    its end; a key is inserted at the cursor, and a valid text sets the value (valueChanged)."""

    def __init__(self, decimals=3):
        self.decimals, self.text, self.cursor, self.focus = decimals, "", 0, False

    @property
    def value(self):
        try:
            return round(float(self.text), self.decimals)
        except ValueError:
            return None

    def write(self, value):
        self.text = f"{value:.{self.decimals}f}"
        self.cursor = len(self.text)

    def key(self, char):
        self.text = self.text[:self.cursor] + char + self.text[self.cursor:]
        self.cursor += 1


def type_into(box, keys, refresh):
    """The user types ``keys`` into the focused box; every valid value goes to the state and the panel refreshes."""
    state = {"lr": 0.001}
    box.write(state["lr"])
    box.focus, box.text, box.cursor = True, "", 0  # select all, start typing
    for char in keys:
        box.key(char)
        if box.value is not None:
            state["lr"] = box.value  # valueChanged -> set_setting
            refresh(box, state["lr"])  # the refresh that follows every change
    box.focus = False
    refresh(box, state["lr"])
    return state["lr"], box.text


def test_typing_0_155_into_a_focused_spin_box_is_not_rewritten_under_the_cursor():
    def guarded(box, value):
        if panelguard.write_into_widget(box.focus, box.value, value):
            box.write(value)

    def always(box, value):  # what the refresh did: write every setting into every widget
        box.write(value)

    assert type_into(SpinBox(), "0.155", guarded) == (0.155, "0.155")
    assert type_into(SpinBox(), "0.155", always) != (0.155, "0.155")  # the cursor jumped: 0.155 could not be typed


def test_a_refresh_writes_only_a_changed_value_into_a_widget_the_user_is_not_editing():
    assert panelguard.write_into_widget(False, 0.1, 0.155)
    assert not panelguard.write_into_widget(True, 0.1, 0.155)  # focused: the user's typing wins
    assert not panelguard.write_into_widget(False, 0.155, 0.155 + 1e-15)  # shows it already: no reformatting
    assert not panelguard.write_into_widget(False, 12, 12.0)
    assert panelguard.write_into_widget(False, 12, 13)
    assert not panelguard.write_into_widget(False, "", None)  # an unset path shows as empty
    assert panelguard.write_into_widget(False, "/a/model.pt", "/b/model.pt")
    assert not panelguard.write_into_widget(True, "/a/mo", "/a/model.pt")  # typing a path
    assert panelguard.write_into_widget(False, False, True) and not panelguard.write_into_widget(False, True, True)


def test_a_widget_shows_its_axis_of_a_per_axis_setting_and_zero_or_empty_when_unset():
    assert panelguard.widget_value([64, 32, 16], 1, True) == 32
    assert panelguard.widget_value([64, 32], 2, True) == 0
    assert panelguard.widget_value(None, 0, True) == 0 and panelguard.widget_value(None, 0, False) == ""
    assert panelguard.widget_value(0.155, 0, True) == 0.155


def test_reload_and_exit_ask_only_while_a_job_the_user_would_lose_runs():
    assert panelguard.leave_question([], "reload") is None
    assert panelguard.leave_question(["probe", "inspect"], "exit") is None  # short, restart by themselves
    q = panelguard.leave_question(["train"], "reload")
    assert q is not None and q.text.startswith("A training is running. Reloading the module cancels it")
    assert "Stop keeps it" in q.text and "reload now?" in q.text
    assert q.yes == "cancel the jobs and reload" and q.no == "keep the jobs running, do not reload"
    q = panelguard.leave_question(["segment", "train", "rank"], "exit")
    assert q.text.startswith("A training, a segmentation and a ranking are running. Exiting Slicer cancels them")
    q = panelguard.leave_question(["segment"], "exit")
    assert "its results are lost" in q.text and "model" not in q.text
    import pytest

    with pytest.raises(ValueError):
        panelguard.leave_question(["train"], "close")


def test_save_model_opens_in_the_last_model_folder_then_slicer_s_scene_folder_then_documents_never_the_working_directory(
        tmp_path, monkeypatch):
    last, scenes, documents = tmp_path / "models", tmp_path / "scenes", tmp_path / "Documents"
    for folder in (scenes, documents):
        folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert panelguard.model_save_path("CTChest model", [str(last), str(scenes), str(documents)]) == str(scenes / "CTChest-model.pt")
    last.mkdir()
    assert panelguard.model_save_path("CTChest model", [str(last), str(scenes), str(documents)]) == str(last / "CTChest-model.pt")
    assert panelguard.model_save_path("", ["", None, str(documents)]) == str(documents / "cpcl-model.pt")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = panelguard.model_save_path("a/b:c", [str(tmp_path / "gone"), ""])
    assert home == str(tmp_path / "home" / "a-b-c.pt") and not home.startswith(str(tmp_path / "cpcl"))
