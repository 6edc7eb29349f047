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
