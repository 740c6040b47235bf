#!/usr/bin/env python3
"""Deterministic generator for the structured parts of qtool's calibration corpus.

Writes two files next to this script:

  data.txt         CSV, JSON, YAML, TOML, markdown tables, log excerpts and
                   other record-like documents with varied numbers and names
  math_drills.txt  short worked arithmetic, unit-conversion and statistics
                   problems with computed answers

All names, places and figures are invented here. The output depends only on
SEED and on this file, so re-running reproduces both files byte for byte:

    python calib_data/generate.py
"""

import json
import math
import random
from pathlib import Path

SEED = 20241126
HERE = Path(__file__).resolve().parent

FIRST = [
    "Ada", "Bram", "Chioma", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines",
    "Jonas", "Keiko", "Luis", "Maeve", "Nikhil", "Oona", "Pavel", "Quinn", "Rosa",
    "Sven", "Tala", "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zora", "Amir",
    "Bea", "Cormac", "Dalia", "Emeka", "Freya", "Gideon", "Hana", "Idris", "Juno",
    "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Rafael", "Saoirse",
    "Tomasz", "Ulla", "Vikram", "Wanda", "Yara", "Zeno",
]
LAST = [
    "Abara", "Brennan", "Castellano", "Dobrev", "Eriksen", "Fournier", "Gallo",
    "Haddad", "Ito", "Jovanovic", "Kowal", "Lindqvist", "Moreau", "Nakamura",
    "Okonkwo", "Petrov", "Quiroga", "Rahman", "Silva", "Tanaka", "Uddin",
    "Varga", "Wojcik", "Xu", "Yilmaz", "Zeller", "Achebe", "Bianchi", "Costa",
    "Delacroix", "Esposito", "Fitzgerald", "Grant", "Holm", "Ivanova", "Jensen",
]
TOWNS = [
    "Ashby Point", "Brayford", "Calder", "Corran", "Dunholm", "Fennwick",
    "Harrowmere", "Helmsby", "Kinloss Quay", "Mirefield", "New Hadley",
    "Penlow", "Port Selwyn", "Stowbridge", "Stroud End", "Thorsby",
    "Hollow Bay", "Ravenna Vale", "Scarby", "Whitestone", "Almera", "Orrin",
]
PRODUCTS = [
    ("espresso beans 1kg", 18.5), ("ceramic mug", 9.0), ("steel water bottle", 21.0),
    ("wool socks", 12.5), ("notebook A5", 6.75), ("desk lamp", 34.0),
    ("phone stand", 14.99), ("canvas tote", 11.0), ("chef's knife", 49.0),
    ("cutting board", 27.5), ("tea infuser", 7.25), ("rain jacket", 89.0),
    ("hiking map", 8.99), ("bike light set", 24.0), ("yoga mat", 31.0),
    ("USB-C cable 2m", 9.99), ("wireless mouse", 22.5), ("plant pot 14cm", 5.5),
    ("seed starter kit", 16.0), ("cast-iron pan", 42.0), ("headlamp", 19.5),
]
CATEGORY_OF = {
    "espresso beans 1kg": "kitchen", "ceramic mug": "kitchen", "steel water bottle": "outdoor",
    "wool socks": "clothing", "notebook A5": "office", "desk lamp": "office",
    "phone stand": "electronics", "canvas tote": "clothing", "chef's knife": "kitchen",
    "cutting board": "kitchen", "tea infuser": "kitchen", "rain jacket": "clothing",
    "hiking map": "outdoor", "bike light set": "outdoor", "yoga mat": "outdoor",
    "USB-C cable 2m": "electronics", "wireless mouse": "electronics", "plant pot 14cm": "garden",
    "seed starter kit": "garden", "cast-iron pan": "kitchen", "headlamp": "outdoor",
}
SPECIES = [
    "blackbird", "robin", "wren", "blue tit", "great tit", "chaffinch", "goldfinch",
    "house sparrow", "starling", "wood pigeon", "magpie", "jackdaw", "dunnock",
    "long-tailed tit", "song thrush", "greenfinch", "nuthatch", "siskin",
]
TEAMS = [
    "Port Selwyn Athletic", "Dunholm Rovers", "Calder United", "Thorsby Town",
    "Mirefield Wanderers", "Kinloss Harbour", "Fennwick Potters", "Stowbridge City",
    "Harrowmere FC", "Corran Albion",
]
ELEMENTS = [
    ("H", "Hydrogen", 1, 1.008), ("He", "Helium", 2, 4.0026), ("Li", "Lithium", 3, 6.94),
    ("C", "Carbon", 6, 12.011), ("N", "Nitrogen", 7, 14.007), ("O", "Oxygen", 8, 15.999),
    ("Na", "Sodium", 11, 22.990), ("Mg", "Magnesium", 12, 24.305), ("Al", "Aluminium", 13, 26.982),
    ("Si", "Silicon", 14, 28.085), ("S", "Sulfur", 16, 32.06), ("Cl", "Chlorine", 17, 35.45),
    ("K", "Potassium", 19, 39.098), ("Ca", "Calcium", 20, 40.078), ("Fe", "Iron", 26, 55.845),
    ("Cu", "Copper", 29, 63.546), ("Zn", "Zinc", 30, 65.38), ("Ag", "Silver", 47, 107.87),
    ("Sn", "Tin", 50, 118.71), ("Au", "Gold", 79, 196.97), ("Pb", "Lead", 82, 207.2),
]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
PATHS = [
    "/", "/index.html", "/about", "/blog/2024/03/spring-planting", "/api/v1/items",
    "/api/v1/items/{id}", "/api/v1/orders", "/login", "/logout", "/static/css/site.css",
    "/static/js/app.js", "/images/logo.png", "/search?q={q}", "/feed.xml", "/robots.txt",
    "/contact", "/docs/getting-started", "/docs/api/authentication", "/favicon.ico",
]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "curl/8.5.0", "python-requests/2.31.0", "ExampleBot/1.2 (+https://bot.example/info)",
]
WORDS = [
    "garden", "tomato", "recipe", "bicycle", "repair", "weather", "river", "museum",
    "train", "timetable", "budget", "kettle", "lantern", "harbour", "festival", "library",
]


def name(r):
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def date(r, year=None):
    y = year or r.randint(2015, 2024)
    m = r.randint(1, 12)
    d = r.randint(1, MONTH_DAYS[m - 1])
    return f"{y:04d}-{m:02d}-{d:02d}"


# ---------------------------------------------------------------- data.txt parts

def csv_weather(r):
    town = r.choice(TOWNS)
    year = r.randint(2018, 2024)
    m = r.randint(1, 12)
    base = 4 + 11 * math.sin((m - 4) / 12 * 2 * math.pi) + r.uniform(-2, 2)
    lines = [f"# Daily observations, {town} weather station, {MONTHS[m - 1]} {year}",
             "date,t_min_c,t_max_c,rain_mm,wind_kmh,sunshine_h,pressure_hpa"]
    p = r.uniform(995, 1025)
    for d in range(1, r.randint(10, 18) + 1):
        tmin = base + r.gauss(-3, 2)
        tmax = tmin + r.uniform(3, 11)
        rain = 0.0 if r.random() < 0.55 else round(r.expovariate(1 / 4.5), 1)
        wind = max(0, round(r.gauss(17, 8)))
        sun = round(max(0.0, min(15.0, r.gauss(4.5, 3) - rain / 4)), 1)
        p += r.gauss(0, 4)
        p = min(1042, max(972, p))
        lines.append(f"{year}-{m:02d}-{d:02d},{tmin:.1f},{tmax:.1f},{rain},{wind},{sun},{p:.1f}")
    return "\n".join(lines)


def csv_sales(r):
    n = r.randint(14, 26)
    lines = ["order_id,date,customer,product,category,qty,unit_price,discount_pct,total"]
    oid = r.randint(10000, 90000)
    year = r.randint(2021, 2024)
    for _ in range(n):
        oid += r.randint(1, 37)
        prod, price = r.choice(PRODUCTS)
        qty = r.choice([1, 1, 1, 2, 2, 3, 4, 6, 10])
        disc = r.choice([0, 0, 0, 5, 10, 15, 20])
        total = qty * price * (1 - disc / 100)
        cust = name(r)
        if "," in prod:
            prod = f'"{prod}"'
        lines.append(f"{oid},{date(r, year)},{cust},{prod},{CATEGORY_OF[prod]},{qty},{price:.2f},{disc},{total:.2f}")
    return "\n".join(lines)


def csv_population(r):
    towns = r.sample(TOWNS, r.randint(6, 10))
    years = [1951, 1961, 1971, 1981, 1991, 2001, 2011, 2021]
    lines = ["# Census population by town (invented figures)", "town," + ",".join(map(str, years))]
    for t in towns:
        pop = r.randint(800, 60000)
        row = []
        for _ in years:
            row.append(str(pop))
            pop = max(120, int(pop * r.uniform(0.9, 1.18)))
        lines.append(f"{t}," + ",".join(row))
    return "\n".join(lines)


def csv_birds(r):
    site = r.choice(TOWNS)
    lines = [f"# Garden bird count, {site}, weekend of {date(r)}", "species,max_count,first_seen,notes"]
    notes = ["", "", "", "pair", "juveniles present", "feeding on seed", "singing",
             "flock overhead", "at bird bath", "one ringed"]
    for sp in r.sample(SPECIES, r.randint(7, 13)):
        h, mnt = r.randint(6, 17), r.choice([0, 5, 10, 15, 20, 30, 40, 45, 50])
        lines.append(f"{sp},{r.randint(1, 24)},{h:02d}:{mnt:02d},{r.choice(notes)}")
    return "\n".join(lines)


def json_product(r):
    prod, price = r.choice(PRODUCTS)
    obj = {
        "id": f"SKU-{r.randint(100000, 999999)}",
        "name": prod,
        "category": CATEGORY_OF[prod],
        "price": {"amount": round(price, 2), "currency": r.choice(["GBP", "EUR", "USD"])},
        "stock": {t: r.randint(0, 140) for t in r.sample(TOWNS, 3)},
        "dimensions_cm": [round(r.uniform(3, 60), 1) for _ in range(3)],
        "weight_kg": round(r.uniform(0.05, 4.5), 3),
        "tags": r.sample(["gift", "bestseller", "eco", "new", "clearance", "handmade", "limited"], r.randint(1, 3)),
        "active": r.random() < 0.85,
        "updated_at": f"{date(r, 2024)}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z",
    }
    return json.dumps(obj, indent=2, ensure_ascii=False)


def json_api_page(r):
    page = r.randint(1, 9)
    per = r.choice([3, 4, 5])
    items = []
    for i in range(per):
        items.append({
            "id": r.randint(1000, 9999),
            "user": {"name": name(r), "city": r.choice(TOWNS)},
            "rating": r.randint(1, 5),
            "text": r.choice([
                "Arrived quickly and works as described.",
                "Smaller than I expected, but good quality.",
                "Stopped working after two weeks; replacement was fine.",
                "Great value. Would buy again.",
                "The colour is slightly different from the photo.",
                "Instructions were confusing, took an hour to assemble.",
                "Perfect gift, my dad loves it.",
            ]),
            "helpful_votes": r.randint(0, 80),
            "created": date(r, 2024),
        })
    total = r.randint(page * per, page * per + 200)
    obj = {"page": page, "per_page": per, "total": total,
           "next": f"/api/v1/reviews?page={page + 1}" if page * per < total else None,
           "data": items}
    return json.dumps(obj, indent=2, ensure_ascii=False)


def json_compact_events(r):
    out = []
    t = r.randint(1_700_000_000, 1_730_000_000)
    for _ in range(r.randint(6, 12)):
        t += r.randint(1, 900)
        ev = r.choice(["page_view", "add_to_cart", "checkout", "search", "login", "signup"])
        rec = {"ts": t, "event": ev, "session": f"{r.getrandbits(32):08x}"}
        if ev == "search":
            rec["query"] = " ".join(r.sample(WORDS, r.randint(1, 3)))
        elif ev in ("add_to_cart", "checkout"):
            rec["value"] = round(r.uniform(3, 250), 2)
        elif ev == "page_view":
            rec["path"] = r.choice(PATHS).replace("{id}", str(r.randint(1, 999))).replace("{q}", r.choice(WORDS))
        out.append(json.dumps(rec, separators=(",", ":")))
    return "\n".join(out)


def yaml_service(r):
    svc = r.choice(["orders", "billing", "search", "inventory", "notifications", "auth", "reports"])
    port = r.choice([8000, 8080, 8443, 9000, 5000, 3000])
    replicas = r.randint(1, 6)
    lines = [
        f"# {svc}-service configuration",
        f"service:",
        f"  name: {svc}",
        f"  port: {port}",
        f"  replicas: {replicas}",
        f"  log_level: {r.choice(['debug', 'info', 'info', 'warning'])}",
        f"database:",
        f"  host: db-{r.randint(1, 4)}.internal",
        f"  port: 5432",
        f"  name: {svc}_prod",
        f"  pool_size: {r.choice([5, 10, 20, 32])}",
        f"  timeout_s: {r.choice([2, 5, 10, 30])}",
        f"cache:",
        f"  enabled: {str(r.random() < 0.7).lower()}",
        f"  ttl_seconds: {r.choice([60, 300, 900, 3600])}",
        f"  max_entries: {r.choice([1000, 5000, 20000, 100000])}",
        f"limits:",
        f"  requests_per_minute: {r.choice([60, 120, 600, 1200])}",
        f"  max_body_kb: {r.choice([64, 256, 1024, 4096])}",
        f"features:",
    ]
    for f in r.sample(["new_checkout", "dark_mode", "bulk_export", "beta_search", "audit_log", "webhooks"], 3):
        lines.append(f"  - name: {f}")
        lines.append(f"    rollout_percent: {r.choice([0, 5, 25, 50, 100])}")
    return "\n".join(lines)


def yaml_ci(r):
    pyv = r.sample(["3.9", "3.10", "3.11", "3.12", "3.13"], r.randint(2, 4))
    pyv.sort(key=lambda v: tuple(int(x) for x in v.split(".")))
    oss = r.sample(["ubuntu-latest", "macos-latest", "windows-latest"], r.randint(1, 3))
    lines = [
        "name: tests",
        "on:",
        "  push:",
        "    branches: [main]",
        "  pull_request:",
        "jobs:",
        "  test:",
        "    runs-on: ${{ matrix.os }}",
        "    strategy:",
        "      fail-fast: false",
        "      matrix:",
        f"        os: [{', '.join(oss)}]",
        f"        python: [{', '.join(repr(v) for v in pyv)}]",
        "    steps:",
        "      - uses: actions/checkout@v4",
        "      - uses: actions/setup-python@v5",
        "        with:",
        "          python-version: ${{ matrix.python }}",
        "      - run: python -m pip install -e '.[test]'",
        f"      - run: python -m pytest -q --maxfail={r.choice([1, 3, 5])} --durations={r.choice([5, 10, 20])}",
    ]
    return "\n".join(lines)


def toml_project(r):
    pkg = r.choice(["tidewater", "saltroad", "lanternlib", "kestrel", "ferrymap", "brickwork", "orrin-tools"])
    major, minor, patch = r.randint(0, 3), r.randint(0, 19), r.randint(0, 9)
    deps = r.sample(["numpy>=1.24", "requests>=2.31", "pyyaml>=6.0", "click>=8.1",
                     "rich>=13.0", "pydantic>=2.5", "httpx>=0.27", "tqdm>=4.66"], r.randint(2, 5))
    lines = [
        "[project]",
        f'name = "{pkg}"',
        f'version = "{major}.{minor}.{patch}"',
        f'description = "Utilities for {r.choice(WORDS)} {r.choice(["data", "maps", "schedules", "records", "reports"])}"',
        f'requires-python = ">={r.choice(["3.9", "3.10", "3.11"])}"',
        'license = "Apache-2.0"',
        "dependencies = [",
    ] + [f'    "{d}",' for d in deps] + [
        "]",
        "",
        "[project.scripts]",
        f'{pkg} = "{pkg.replace("-", "_")}.cli:main"',
        "",
        "[tool.pytest.ini_options]",
        'testpaths = ["tests"]',
        f"addopts = \"-ra --strict-markers\"",
    ]
    return "\n".join(lines)


def md_league(r):
    teams = r.sample(TEAMS, r.randint(6, 10))
    rows = []
    p = 2 * (len(teams) - 1) * r.choice([1, 2])  # everyone plays everyone, home and away
    for t in teams:
        w = r.randint(4, p - 6)
        d = r.randint(2, p - w - 2)
        l = p - w - d
        gf = r.randint(w * 1 + 10, w * 2 + 30)
        ga = r.randint(l * 1 + 10, l * 2 + 30)
        rows.append((t, p, w, d, l, gf, ga, gf - ga, 3 * w + d))
    rows.sort(key=lambda x: (-x[8], -x[7], -x[5], x[0]))
    out = [f"Final table, {r.choice(['Northern', 'Coastal', 'Valley', 'Premier'])} League {r.randint(2010, 2024)}", "",
           "| Pos | Team | P | W | D | L | GF | GA | GD | Pts |",
           "|----:|------|--:|--:|--:|--:|---:|---:|---:|----:|"]
    for i, row in enumerate(rows, 1):
        t, p, w, d, l, gf, ga, gd, pts = row
        out.append(f"| {i} | {t} | {p} | {w} | {d} | {l} | {gf} | {ga} | {gd:+d} | {pts} |")
    return "\n".join(out)


def md_nutrition(r):
    foods = [("Oats", 389, 16.9, 66.3, 6.9), ("Lentils, cooked", 116, 9.0, 20.1, 0.4),
             ("Banana", 89, 1.1, 22.8, 0.3), ("Cheddar", 403, 24.9, 1.3, 33.1),
             ("Brown rice, cooked", 123, 2.7, 25.6, 1.0), ("Almonds", 579, 21.2, 21.6, 49.9),
             ("Egg, boiled", 155, 12.6, 1.1, 10.6), ("Broccoli", 34, 2.8, 6.6, 0.4),
             ("Salmon, baked", 206, 22.1, 0.0, 12.4), ("Potato, baked", 93, 2.5, 21.2, 0.1),
             ("Greek yoghurt", 97, 9.0, 3.98, 5.0), ("Chickpeas, cooked", 164, 8.9, 27.4, 2.6),
             ("Apple", 52, 0.3, 13.8, 0.2), ("Wholemeal bread", 247, 13.0, 41.0, 3.4)]
    sel = r.sample(foods, r.randint(5, 9))
    out = ["Approximate nutrition per 100 g (rounded, for illustration)", "",
           "| Food | Energy (kcal) | Protein (g) | Carbohydrate (g) | Fat (g) |",
           "|------|--------------:|------------:|-----------------:|--------:|"]
    for f, e, p, c, fat in sel:
        out.append(f"| {f} | {e} | {p} | {c} | {fat} |")
    return "\n".join(out)


def md_timetable(r):
    a, b = r.sample(TOWNS, 2)
    stops = [a] + r.sample([t for t in TOWNS if t not in (a, b)], r.randint(2, 4)) + [b]
    deps = sorted(r.sample(range(5 * 60 + 30, 21 * 60, 5), r.randint(5, 8)))
    hops = [r.randint(6, 28) for _ in stops[1:]]
    out = [f"Bus route {r.randint(1, 99)}{r.choice(['', 'A', 'X'])}: {a} → {b} (Mondays to Fridays)", "",
           "| Stop | " + " | ".join(f"Trip {i + 1}" for i in range(len(deps))) + " |",
           "|------|" + "|".join("-----:" for _ in deps) + "|"]
    for si, s in enumerate(stops):
        cells = []
        for d0 in deps:
            t = d0 + sum(hops[:si])
            cells.append(f"{t // 60:02d}:{t % 60:02d}")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def md_elements(r):
    sel = sorted(r.sample(ELEMENTS, r.randint(6, 10)), key=lambda e: e[2])
    out = ["| Symbol | Element | Atomic number | Standard atomic weight |",
           "|:------:|---------|--------------:|-----------------------:|"]
    for s, n, z, w in sel:
        out.append(f"| {s} | {n} | {z} | {w} |")
    return "Selected chemical elements\n\n" + "\n".join(out)


def access_log(r):
    lines = []
    h, m, s = r.randint(0, 22), r.randint(0, 59), r.randint(0, 59)
    day = r.randint(1, 28)
    mon = r.choice(MONTHS)
    for _ in range(r.randint(10, 18)):
        s += r.randint(0, 40)
        m += s // 60
        s %= 60
        h += m // 60
        m %= 60
        h %= 24
        ip = f"{r.randint(11, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        path = r.choice(PATHS).replace("{id}", str(r.randint(1, 4999))).replace("{q}", r.choice(WORDS))
        method = "POST" if path in ("/login", "/api/v1/orders") and r.random() < 0.6 else "GET"
        status = r.choices([200, 304, 301, 404, 500, 401, 201], weights=[80, 8, 3, 5, 1, 2, 1])[0]
        size = 0 if status in (304, 301) else r.randint(180, 98000)
        lines.append(f'{ip} - - [{day:02d}/{mon}/2024:{h:02d}:{m:02d}:{s:02d} +0000] "{method} {path} HTTP/1.1" '
                     f'{status} {size} "-" "{r.choice(AGENTS)}"')
    return "\n".join(lines)


def app_log(r):
    svc = r.choice(["worker", "api", "scheduler", "ingest"])
    t = r.randint(0, 80000)
    msgs = [
        ("INFO", "starting {svc} v{v} (pid {pid})"),
        ("INFO", "connected to database db-{n}.internal:5432 in {ms} ms"),
        ("DEBUG", "loaded {k} rows from cache"),
        ("INFO", "processed batch {b}: {k} records in {ms} ms"),
        ("WARNING", "slow query ({ms} ms): SELECT * FROM events WHERE account_id = $1"),
        ("INFO", "http GET /healthz 200 {ms2} ms"),
        ("WARNING", "retrying upload to bucket 'exports' (attempt {a}/5)"),
        ("ERROR", "timeout after {s}s waiting for lock on table 'invoices'"),
        ("INFO", "scheduled job 'nightly-report' finished, {k} rows written"),
        ("DEBUG", "gc: freed {mb} MB, heap now {heap} MB"),
    ]
    out = []
    for i in range(r.randint(9, 15)):
        t += r.randint(0, 300)
        lvl, tmpl = msgs[0] if i == 0 else r.choice(msgs[1:])
        msg = tmpl.format(svc=svc, v=f"{r.randint(1, 4)}.{r.randint(0, 30)}.{r.randint(0, 9)}",
                          pid=r.randint(1000, 65000), n=r.randint(1, 4), ms=r.randint(3, 4000),
                          ms2=r.randint(1, 40), k=r.randint(10, 50000), b=r.randint(1, 999),
                          a=r.randint(1, 5), s=r.choice([5, 10, 30, 60]), mb=r.randint(2, 400),
                          heap=r.randint(60, 2000))
        out.append(f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{(t // 3600) % 24:02d}:{(t // 60) % 60:02d}:"
                   f"{t % 60:02d}.{r.randint(0, 999):03d}Z {lvl:<7} [{svc}] {msg}")
    return "\n".join(out)


def ini_config(r):
    return "\n".join([
        "; desktop application settings",
        "[general]",
        f"language = {r.choice(['en-GB', 'en-US', 'fr-FR', 'de-DE', 'es-ES', 'it-IT'])}",
        f"theme = {r.choice(['light', 'dark', 'system'])}",
        f"autosave_minutes = {r.choice([1, 2, 5, 10, 15])}",
        f"recent_files_max = {r.choice([5, 10, 20])}",
        "",
        "[editor]",
        f"font = {r.choice(['DejaVu Sans Mono', 'Fira Code', 'Source Code Pro', 'Courier New'])}",
        f"font_size = {r.choice([10, 11, 12, 13, 14, 16])}",
        f"tab_width = {r.choice([2, 4, 8])}",
        f"wrap_lines = {r.choice(['true', 'false'])}",
        "",
        "[network]",
        f"proxy = {r.choice(['', 'http://proxy.local:3128'])}".rstrip(),
        f"timeout = {r.choice([10, 30, 60])}",
        f"check_updates = {r.choice(['daily', 'weekly', 'never'])}",
    ])


def receipt(r):
    shop = f"{r.choice(['Corner', 'Village', 'Harbour', 'Market', 'Station'])} {r.choice(['Stores', 'Grocer', 'Deli', 'Pantry'])}"
    items = [("Milk 2L", 1.65), ("Sourdough loaf", 3.80), ("Eggs x12", 3.20), ("Butter 250g", 2.45),
             ("Apples 1kg", 2.10), ("Coffee 227g", 4.75), ("Pasta 500g", 0.95), ("Tinned tomatoes", 0.70),
             ("Cheddar 400g", 4.10), ("Bananas", 1.15), ("Porridge oats 1kg", 1.60), ("Dish soap", 1.99),
             ("Onions 1kg", 0.99), ("Rice 2kg", 3.49), ("Orange juice 1L", 1.85), ("Yoghurt 500g", 1.40)]
    sel = r.sample(items, r.randint(4, 9))
    out = [shop.upper(), f"{r.randint(1, 180)} {r.choice(['High St', 'Quay Rd', 'Mill Lane', 'Church St'])}, {r.choice(TOWNS)}",
           f"{date(r, 2024)} {r.randint(7, 20):02d}:{r.randint(0, 59):02d}  till {r.randint(1, 4)}", "-" * 32]
    total = 0.0
    for it, p in sel:
        q = r.choice([1, 1, 1, 2, 3])
        line = q * p
        total += line
        lab = f"{q} x {it}" if q > 1 else it
        out.append(f"{lab:<24}{line:>8.2f}")
    out.append("-" * 32)
    out.append(f"{'TOTAL':<24}{total:>8.2f}")
    paid = r.choice(["CARD", "CASH"])
    if paid == "CASH":
        tendered = math.ceil(total / 5) * 5
        out.append(f"{'CASH':<24}{tendered:>8.2f}")
        out.append(f"{'CHANGE':<24}{tendered - total:>8.2f}")
    else:
        out.append(f"{'CARD ****' + str(r.randint(1000, 9999)):<24}{total:>8.2f}")
    out.append("Thank you for shopping local!")
    return "\n".join(out)


def sql_insert(r):
    rows = []
    for i in range(r.randint(5, 9)):
        rows.append(f"    ({i + 1}, '{name(r).replace(chr(39), chr(39) * 2)}', '{r.choice(TOWNS)}', "
                    f"DATE '{date(r)}', {r.randint(18, 90)}, {round(r.uniform(0, 2500), 2)})")
    return ("INSERT INTO members (id, full_name, town, joined_on, age, balance) VALUES\n"
            + ",\n".join(rows) + ";")


def xml_feed(r):
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<stations>"]
    for t in r.sample(TOWNS, r.randint(3, 6)):
        out.append(f'  <station id="{r.randint(100, 999)}" name="{t}">')
        out.append(f"    <lat>{r.uniform(50, 58):.4f}</lat>")
        out.append(f"    <lon>{r.uniform(-6, 2):.4f}</lon>")
        out.append(f"    <elevation unit=\"m\">{r.randint(2, 480)}</elevation>")
        out.append(f"    <reading time=\"{r.randint(0, 23):02d}:00\" temp_c=\"{r.uniform(-4, 28):.1f}\" "
                   f"humidity=\"{r.randint(35, 99)}\"/>")
        out.append("  </station>")
    out.append("</stations>")
    return "\n".join(out)


def tsv_race(r):
    race = f"{r.choice(TOWNS)} {r.choice(['10K', 'Half Marathon', 'Parkrun', 'Fell Race'])} {r.randint(2012, 2024)}"
    base = {"10K": 1900, "Half Marathon": 4300, "Parkrun": 1050, "Fell Race": 3600}
    key = next(k for k in base if k in race)
    t = base[key] + r.randint(-120, 200)
    out = [f"Results: {race}", "pos\tbib\tname\tclub\tcategory\ttime"]
    for pos in range(1, r.randint(10, 16) + 1):
        t += r.randint(2, 95)
        hh, mm, ss = t // 3600, (t // 60) % 60, t % 60
        club = r.choice(["Unattached", f"{r.choice(TOWNS)} Harriers", f"{r.choice(TOWNS)} AC", f"{r.choice(TOWNS)} Striders"])
        cat = r.choice(["SM", "SF", "M40", "F40", "M50", "F50", "M60"])
        out.append(f"{pos}\t{r.randint(1, 1500)}\t{name(r)}\t{club}\t{cat}\t{hh}:{mm:02d}:{ss:02d}")
    return "\n".join(out)


def env_file(r):
    return "\n".join([
        "# .env.example — copy to .env and fill in real values",
        f"APP_ENV={r.choice(['development', 'staging', 'production'])}",
        f"APP_PORT={r.choice([3000, 5000, 8000, 8080])}",
        f"DATABASE_URL=postgres://app:change-me@localhost:5432/{r.choice(['shop', 'library', 'bookings', 'metrics'])}",
        f"REDIS_URL=redis://localhost:6379/{r.randint(0, 3)}",
        f"LOG_LEVEL={r.choice(['debug', 'info'])}",
        f"SESSION_TTL_MINUTES={r.choice([15, 30, 60, 720])}",
        "SMTP_HOST=smtp.example.com",
        f"SMTP_PORT={r.choice([25, 465, 587])}",
        f"FEATURE_BETA_SEARCH={r.choice(['true', 'false'])}",
    ])


def exchange_table(r):
    cur = [("EUR", 1.17), ("USD", 1.27), ("JPY", 188.0), ("CHF", 1.12), ("SEK", 13.4),
           ("NOK", 13.6), ("CAD", 1.72), ("AUD", 1.92), ("INR", 105.5), ("PLN", 5.05)]
    d = date(r, 2024)
    out = [f"Indicative rates per 1 GBP, {d} (illustrative)", "", "| Currency | Buy | Sell | Change |",
           "|----------|----:|-----:|-------:|"]
    for c, mid in r.sample(cur, r.randint(5, 8)):
        m = mid * r.uniform(0.97, 1.03)
        spread = m * 0.02
        out.append(f"| {c} | {m - spread:.4f} | {m + spread:.4f} | {r.uniform(-1.2, 1.2):+.2f}% |")
    return "\n".join(out)


# (maker, number of documents). Makers with a lot of fixed template text are
# used only once or twice, so the corpus does not repeat the same lines.
DATA_MAKERS = [(csv_weather, 1), (csv_sales, 2), (csv_population, 2), (csv_birds, 2),
               (json_product, 2), (json_api_page, 2), (json_compact_events, 2), (yaml_service, 1),
               (yaml_ci, 1), (toml_project, 1), (md_league, 2), (md_nutrition, 1), (md_timetable, 2),
               (md_elements, 1), (access_log, 1), (app_log, 2), (ini_config, 1), (receipt, 2),
               (sql_insert, 2), (xml_feed, 1), (tsv_race, 2), (env_file, 1), (exchange_table, 1)]


def build_data(r):
    docs = []
    # Each maker is used several times, in a shuffled order, so neighbouring
    # documents differ in format.
    plan = [m for m, k in DATA_MAKERS for _ in range(k)]
    r.shuffle(plan)
    for maker in plan:
        docs.append(maker(r))
    return "\n\n".join(docs) + "\n"


# ----------------------------------------------------------- math_drills.txt parts

def drill_recipe(r):
    serves = r.choice([2, 4, 6])
    want = r.choice([s for s in (3, 5, 8, 10, 12) if s != serves])
    flour = r.choice([150, 200, 250, 300, 450])
    milk = r.choice([100, 200, 250, 300])
    eggs = r.choice([1, 2, 3])
    f = want / serves
    return (f"Q: A recipe for {serves} people uses {flour} g of flour, {milk} ml of milk and {eggs} egg{'s' if eggs > 1 else ''}. "
            f"How much of each is needed for {want} people?\n"
            f"A: Scale every quantity by {want}/{serves} = {f:.3g}. Flour: {flour} × {f:.3g} = {flour * f:.0f} g. "
            f"Milk: {milk} × {f:.3g} = {milk * f:.0f} ml. Eggs: {eggs} × {f:.3g} = {eggs * f:.2f}, "
            f"so in practice use {max(1, math.floor(eggs * f + 0.5))}.")


def drill_speed(r):
    d = r.choice([12, 45, 60, 84, 150, 210, 336, 420])
    h = r.choice([0.5, 0.75, 1.5, 2, 2.5, 3.5, 4])
    v = d / h
    return (f"Q: A {r.choice(['train', 'cyclist', 'ferry', 'coach', 'runner'])} covers {d} km in {h:g} hours. "
            f"What is its average speed in km/h and in m/s?\n"
            f"A: Speed = distance / time = {d} / {h:g} = {v:.2f} km/h. To convert to m/s divide by 3.6: "
            f"{v:.2f} / 3.6 = {v / 3.6:.2f} m/s.")


def drill_percent(r):
    old = r.randint(40, 2000)
    new = old + r.randint(-old // 2, old)
    ch = (new - old) / old * 100
    thing = r.choice(["visitors to a museum", "the price of a bicycle", "monthly rent", "members of a club",
                      "tickets sold", "the population of a village"])
    return (f"Q: {thing.capitalize()} went from {old} to {new}. What is the percentage change?\n"
            f"A: Change = {new} − {old} = {new - old}. Percentage change = {new - old} / {old} × 100 = {ch:.1f}%"
            f"{' (an increase)' if ch > 0 else ' (a decrease)' if ch < 0 else ''}.")


def drill_units(r):
    kind = r.randrange(5)
    if kind == 0:
        c = r.randint(-20, 40)
        return f"Q: Convert {c} °C to Fahrenheit.\nA: F = C × 9/5 + 32 = {c} × 1.8 + 32 = {c * 1.8 + 32:.1f} °F."
    if kind == 1:
        mi = r.choice([3, 5, 13.1, 26.2, 50, 100])
        return f"Q: How many kilometres is {mi:g} miles?\nA: 1 mile ≈ 1.609 km, so {mi:g} × 1.609 ≈ {mi * 1.609344:.2f} km."
    if kind == 2:
        kg = r.choice([2.5, 10, 63, 75, 112])
        return f"Q: Express {kg:g} kg in pounds.\nA: 1 kg ≈ 2.2046 lb, so {kg:g} × 2.2046 ≈ {kg * 2.20462:.1f} lb."
    if kind == 3:
        l, w, h = r.randint(20, 120), r.randint(20, 60), r.randint(15, 50)
        v = l * w * h
        return (f"Q: A fish tank measures {l} cm × {w} cm × {h} cm. How many litres does it hold when full?\n"
                f"A: Volume = {l} × {w} × {h} = {v:,} cm³. Since 1 litre = 1,000 cm³, that is {v / 1000:.1f} litres.")
    s = r.randint(1000, 90000)
    return (f"Q: How long is {s:,} seconds in hours, minutes and seconds?\n"
            f"A: {s:,} ÷ 3600 = {s // 3600} h remainder {s % 3600}; {s % 3600} ÷ 60 = {(s % 3600) // 60} min remainder "
            f"{s % 60}. So {s // 3600} h {(s % 3600) // 60} min {s % 60} s.")


def drill_stats(r):
    n = r.randint(5, 9)
    xs = [r.randint(1, 60) for _ in range(n)]
    srt = sorted(xs)
    mean = sum(xs) / n
    med = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return (f"Q: Find the mean, median, range and sample standard deviation of: {', '.join(map(str, xs))}.\n"
            f"A: Sorted: {', '.join(map(str, srt))}. Mean = {sum(xs)} / {n} = {mean:.2f}. Median = {med:g}. "
            f"Range = {srt[-1]} − {srt[0]} = {srt[-1] - srt[0]}. Sample variance = {var:.2f}, "
            f"so the standard deviation is √{var:.2f} ≈ {math.sqrt(var):.2f}.")


def drill_interest(r):
    p = r.choice([500, 1000, 2500, 5000, 12000])
    rate = r.choice([1.5, 2, 3, 4.5, 5, 7])
    t = r.randint(2, 15)
    a = p * (1 + rate / 100) ** t
    return (f"Q: {p:,} is saved at {rate:g}% per year, compounded annually, for {t} years. What is the final balance?\n"
            f"A: A = P(1 + r)^t = {p:,} × {1 + rate / 100:g}^{t} = {a:,.2f}. Interest earned: {a - p:,.2f}.")


def drill_linear(r):
    a = r.choice([2, 3, 4, 5, 6, 7, -2, -3])
    x = r.randint(-9, 12)
    b = r.randint(-20, 20)
    c = a * x + b
    return (f"Q: Solve {a}x {'+' if b >= 0 else '−'} {abs(b)} = {c}.\n"
            f"A: Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {x}. "
            f"Check: {a} × {x} {'+' if b >= 0 else '−'} {abs(b)} = {c}. ✓")


def drill_area(r):
    kind = r.randrange(3)
    if kind == 0:
        rad = r.randint(2, 40)
        return (f"Q: Find the area and circumference of a circle of radius {rad} cm.\n"
                f"A: Area = πr² = π × {rad}² ≈ {math.pi * rad * rad:.2f} cm². Circumference = 2πr ≈ {2 * math.pi * rad:.2f} cm.")
    if kind == 1:
        b, h = r.randint(3, 30), r.randint(3, 30)
        return (f"Q: A triangle has base {b} m and height {h} m. What is its area?\n"
                f"A: Area = ½ × base × height = 0.5 × {b} × {h} = {b * h / 2:g} m².")
    l, w = r.randint(3, 14), r.randint(2, 9)
    cost = r.choice([12, 18, 25, 32, 45])
    return (f"Q: A room is {l} m by {w} m. Flooring costs {cost} per square metre. What does it cost to floor the room, "
            f"allowing 10% extra for waste?\nA: Area = {l} × {w} = {l * w} m². With 10% extra: {l * w * 1.1:.1f} m². "
            f"Cost = {l * w * 1.1:.1f} × {cost} = {l * w * 1.1 * cost:.2f}.")


def drill_prob(r):
    red, blue = r.randint(2, 9), r.randint(2, 9)
    tot = red + blue
    p2 = red * (red - 1) / (tot * (tot - 1))
    return (f"Q: A bag holds {red} red and {blue} blue counters. Two are drawn without replacement. "
            f"What is the probability both are red?\n"
            f"A: P = ({red}/{tot}) × ({red - 1}/{tot - 1}) = {red * (red - 1)}/{tot * (tot - 1)} ≈ {p2:.3f}.")


def drill_binary(r):
    n = r.randint(5, 1023)
    return (f"Q: Write {n} in binary and hexadecimal.\n"
            f"A: {n} = {bin(n)[2:]} in binary (0b{bin(n)[2:]}) and {hex(n)[2:].upper()} in hexadecimal (0x{hex(n)[2:].upper()}).")


def drill_bytes(r):
    params = r.choice([135, 360, 1700, 7000, 8000, 13000, 70000])
    bits = r.choice([16, 8, 4, 3])
    gb = params * 1e6 * bits / 8 / 1e9
    return (f"Q: Roughly how much memory do the weights of a {params:,}M-parameter model take at {bits} bits per weight?\n"
            f"A: {params:,} × 10⁶ parameters × {bits} bits ÷ 8 bits per byte = {params * 1e6 * bits / 8:,.0f} bytes "
            f"≈ {gb:.2f} GB, ignoring scales, zero points and other overhead.")


DRILLS = [drill_recipe, drill_speed, drill_percent, drill_units, drill_stats, drill_interest,
          drill_linear, drill_area, drill_prob, drill_binary, drill_bytes]


def build_drills(r):
    plan = [d for d in DRILLS for _ in range(4)]
    r.shuffle(plan)
    out, seen = [], set()
    for d in plan:
        text = d(r)
        while text in seen:  # never emit the same problem twice
            text = d(r)
        seen.add(text)
        out.append(text)
    return "\n\n".join(out) + "\n"


def main():
    r = random.Random(SEED)
    (HERE / "data.txt").write_text(build_data(r), encoding="utf-8")
    (HERE / "math_drills.txt").write_text(build_drills(r), encoding="utf-8")


if __name__ == "__main__":
    main()
