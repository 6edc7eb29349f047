"""The MOS listening page: blinded and self-contained, rated in a real headless Chromium,
exported to CSV without a server, and aggregated into MOS with 95% intervals."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sashimi.errors import UserError
from sashimi.io import write_wav
from sashimi.listening import mos_table, plan, read_ratings, write_page

SR = 16000


def _clips(tmp_path: Path) -> dict[tuple[str, str], list[Path]]:
    rng = np.random.default_rng(0)
    clips: dict[tuple[str, str], list[Path]] = {}
    for ds, models in (("sc09", ("real", "sashimi-sc09")), ("youtubemix", ("sashimi-youtubemix",))):
        for m in models:
            paths = []
            for i in range(2):
                p = tmp_path / "wavs" / ds / m / f"{i}.wav"
                write_wav(p, (0.1 * rng.standard_normal(SR // 4)).astype(np.float32), SR)
                paths.append(p)
            clips[(ds, m)] = paths
    return clips


KINDS = {"sc09": "speech", "youtubemix": "music"}


def test_page_is_blinded_and_self_contained(tmp_path):
    rows = plan(_clips(tmp_path), seed=3)
    page, key = tmp_path / "listening_test.html", tmp_path / "key.csv"
    write_page(rows, KINDS, page, key)
    text = page.read_text()
    assert "sashimi-sc09" not in text and "wavs/" not in text  # no model name, no file path
    assert text.count("data:audio/wav;base64,") == 6  # every clip embedded
    assert "intelligibility" in text and "musicality" in text
    k = pd.read_csv(key)
    assert sorted(k["model"].unique()) == ["real", "sashimi-sc09", "sashimi-youtubemix"]
    # shuffled: the order depends on the seed, the set does not
    other = plan(_clips(tmp_path / "b"), seed=4)
    assert [r["model"] for r in rows] != [r["model"] for r in other] or len(rows) < 3


def test_mos_interval_and_bad_ratings(tmp_path):
    rows = plan(_clips(tmp_path), seed=0)
    key = tmp_path / "key.csv"
    write_page(rows, KINDS, tmp_path / "p.html", key)
    real = [r["clip"] for r in rows if r["model"] == "real"]
    f = tmp_path / "r.csv"
    f.write_text(
        "rater,clip,question,rating\n"
        + "".join(f"a,{c},quality,{v}\n" for c, v in zip(real, (4, 5)))
        + "".join(f"b,{c},quality,{v}\n" for c, v in zip(real, (3, 4)))
    )
    t = mos_table(read_ratings([f], key))
    row = t[(t.model == "real") & (t.question == "quality")].iloc[0]
    x = np.array([4, 5, 3, 4.0])
    assert row["n"] == 4 and row["mos"] == pytest.approx(4.0)
    assert row["ci95"] == pytest.approx(3.182446 * x.std(ddof=1) / 2, rel=1e-5)
    f.write_text(f"rater,clip,question,rating\na,{real[0]},quality,7\n")
    with pytest.raises(UserError, match="r.csv: rating '7'"):
        read_ratings([f], key)
    f.write_text("rater,clip,question,rating\na,cdeadbeef00,quality,3\n")
    with pytest.raises(UserError, match="not in"):
        read_ratings([f], key)


def _chrome(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(
            "no Chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_rate_every_clip_in_chromium_export_and_aggregate(tmp_path):
    rows = plan(_clips(tmp_path), seed=1)
    page, key = tmp_path / "listening_test.html", tmp_path / "key.csv"
    write_page(rows, KINDS, page, key)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    drv = _chrome(downloads)
    try:
        from selenium.webdriver.common.by import By

        drv.get(page.as_uri())
        drv.find_element(By.ID, "rater").send_keys("tester")
        # rate clip k of the page with (k % 5) + 1 on every question
        expected = {}
        for k, clip in enumerate(drv.find_elements(By.CLASS_NAME, "clip")):
            cid = clip.get_attribute("id")
            for q in {"sc09": ("quality", "intelligibility")}.get(
                next(r["dataset"] for r in rows if r["clip"] == cid), ("fidelity", "musicality")
            ):
                v = k % 5 + 1
                clip.find_element(By.CSS_SELECTOR, f"input[name='{cid}-{q}'][value='{v}']").click()
                expected[(cid, q)] = v
        drv.find_element(By.ID, "export").click()
        shown = drv.find_element(By.ID, "csv").get_attribute("value")
        assert (
            drv.find_element(By.ID, "progress").text
            == f"{len(expected)} of {len(expected)} answered"
        )
        target = downloads / "ratings-tester.csv"
        for _ in range(50):  # the browser writes the download asynchronously
            if target.is_file() and target.stat().st_size:
                break
            time.sleep(0.1)
    finally:
        drv.quit()
    assert target.read_text() == shown  # the exported file is what the page shows
    got = pd.read_csv(target)
    assert len(got) == len(rows) * 2 and set(got["rater"]) == {"tester"}
    assert {(c, q): v for c, q, v in zip(got["clip"], got["question"], got["rating"])} == expected
    t = mos_table(read_ratings([target], key))
    assert set(t["model"]) == {"real", "sashimi-sc09", "sashimi-youtubemix"}
    assert set(t["question"]) == {"quality", "intelligibility", "fidelity", "musicality"}
    assert t["n"].sum() == len(rows) * 2


def test_report_writes_the_page_and_the_mos_table(tmp_path):
    from sashimi.config import load_params
    from sashimi.report.mos import KEY, PAGE, mos_report_table, write_listening_page
    from sashimi.report.render import to_markdown

    root = Path(__file__).resolve().parents[1]
    P = load_params(root / "params.yaml", scale="demo", check_models=False)
    clips = _clips(tmp_path)
    groups = {
        "real-sc09": clips[("sc09", "real")],
        "sashimi-sc09": clips[("sc09", "sashimi-sc09")],
        "sashimi-youtubemix": clips[("youtubemix", "sashimi-youtubemix")],
    }
    out = tmp_path / "results"
    assert write_listening_page(P, groups, out) == [out / PAGE, out / KEY]
    page = (out / PAGE).read_text()
    assert "intelligibility" in page and "musicality" in page  # SC09 speech, YouTubeMix music
    key = pd.read_csv(out / KEY)
    ratings = tmp_path / "r.csv"
    qs = {"sc09": ("quality", "intelligibility"), "youtubemix": ("fidelity", "musicality")}
    ratings.write_text(
        "rater,clip,question,rating\n"
        + "".join(
            f"a,{c},{q},{5 if m == 'real' else 2}\n"
            for c, ds, m in zip(key["clip"], key["dataset"], key["model"])
            for q in qs[ds]
        )
    )
    md = to_markdown(mos_report_table(P, [ratings], out), P)
    real_line = next(line for line in md.splitlines() if "Real data" in line and "quality" in line)
    assert "5.00" in real_line and "| 2 |" in real_line  # two clips, one rater
    assert md.count("2.00 ± 0.00") == 4  # two generated groups x two questions
