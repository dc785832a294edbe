import pytest

from ragcache.chunkstore.policy import CostModel, LFUPolicy, LRUPolicy, PGDSFPolicy, make_policy

COST = CostModel(per_token=1e-4, per_token_pair=1e-7, fixed=0.0)


def _run(policy, capacity, requests, sizes, costs):
    """A one-tier cache; returns the keys cached at the end."""
    cached: dict[str, int] = {}
    frequency: dict[str, int] = {}
    for key in requests:
        frequency[key] = frequency.get(key, 0) + 1
        if key in cached:
            policy.on_access(key, frequency[key])
            continue
        while sum(cached.values()) + sizes[key] > capacity:
            victim = policy.pick_victim()
            policy.on_evict(victim)
            del cached[victim]
        cached[key] = sizes[key]
        policy.on_insert(key, sizes[key], costs[key], frequency[key])
    return set(cached)


def test_pgdsf_keeps_the_costly_small_entry_lru_does_not():
    sizes = {"small-costly": 10, "big-cheap-1": 50, "big-cheap-2": 50}
    costs = {"small-costly": 5.0, "big-cheap-1": 1.0, "big-cheap-2": 1.0}
    requests = ["small-costly", "big-cheap-1", "big-cheap-2"]
    assert "small-costly" in _run(PGDSFPolicy(), 100, requests, sizes, costs)
    assert "small-costly" not in _run(LRUPolicy(), 100, requests, sizes, costs)


def test_lfu_keeps_the_frequent_entry():
    sizes = dict.fromkeys("abc", 10)
    costs = dict.fromkeys("abc", 1.0)
    assert "a" in _run(LFUPolicy(), 20, ["a", "a", "a", "b", "c"], sizes, costs)
    assert "a" not in _run(LRUPolicy(), 20, ["a", "a", "a", "b", "c"], sizes, costs)


def test_pgdsf_clock_rises_to_the_evicted_priority():
    policy = PGDSFPolicy()
    policy.on_insert("a", 10, 2.0)
    policy.on_insert("b", 10, 8.0)
    assert policy.pick_victim() == "a"
    policy.on_evict("a")
    assert policy.clock == pytest.approx(0.2)
    policy.on_insert("c", 10, 2.0)
    assert policy.priority("c")[0] == pytest.approx(0.4)


def test_pick_victim_respects_the_filter_and_keeps_rejected_entries():
    policy = LRUPolicy()
    for key in "abc":
        policy.on_insert(key, 1, 1.0)
    assert policy.pick_victim(lambda key: key != "a") == "b"
    assert policy.pick_victim() == "a"
    assert policy.pick_victim(lambda key: False) is None
    assert len(policy) == 3


def test_cost_model_fits_superlinear_samples():
    truth = CostModel(per_token=3e-4, per_token_pair=2e-8, fixed=4e-3)
    samples = [(n, truth.seconds(n)) for n in (32, 128, 512, 1024, 2048)]
    fitted = CostModel.fit(samples)
    for n in (64, 700, 4096):
        assert fitted.seconds(n) == pytest.approx(truth.seconds(n), rel=1e-6)
    with_offsets = [(n, p, truth.seconds(n, p)) for n in (64, 512) for p in (0, 256, 1024)]
    assert CostModel.fit(with_offsets).seconds(300, 100) == pytest.approx(
        truth.seconds(300, 100), rel=1e-6
    )


def test_cost_model_fit_never_goes_negative():
    fitted = CostModel.fit([(100, 0.5), (200, 0.4), (400, 0.3)])
    assert min(fitted.per_token, fitted.per_token_pair, fitted.fixed) >= 0
    assert fitted.seconds(1000) > fitted.seconds(10) or fitted.per_token == 0


def test_cost_grows_with_offset_and_policy_names():
    assert COST.seconds(100, 1000) > COST.seconds(100, 0)
    assert make_policy("PGDSF").name == "pgdsf"
    with pytest.raises(ValueError, match="pgdsf, lru, lfu"):
        make_policy("arc")
    with pytest.raises(ValueError, match="at least 3 samples"):
        CostModel.fit([(1, 1.0)])


def test_pick_victims_frees_enough_without_evicting():
    policy = LRUPolicy()
    for key, size in (("a", 4), ("b", 4), ("c", 4)):
        policy.on_insert(key, size, 1.0)
    assert policy.pick_victims(6) == ["a", "b"]
    assert policy.pick_victims(6, lambda key: key != "a") == ["b", "c"]
    assert policy.pick_victims(13) is None
    assert len(policy) == 3 and policy.pick_victim() == "a"


def test_pgdsf_admission_keeps_a_proven_entry_from_a_one_off_newcomer():
    policy = PGDSFPolicy()
    for _ in range(3):
        policy.on_request("hot")
    policy.on_insert("hot", 10, 1.0, 3)
    policy.on_request("new")
    assert not policy.admits("new", 1.0, ["hot"])
    # Three times as costly to recompute: worth the same three requests.
    assert policy.admits("new", 3.0, ["hot"])
    for _ in range(3):
        policy.on_request("new")
    assert policy.admits("new", 1.0, ["hot"])
    assert PGDSFPolicy(admission=False).admits("new", 0.0, ["hot"])
    assert LRUPolicy().admits("new", 0.0, ["hot"])


def test_pgdsf_recent_counts_halve_so_old_popularity_fades():
    policy = PGDSFPolicy()
    policy.on_insert("old", 10, 1.0)
    window = PGDSFPolicy.ADMISSION_WINDOW * len(policy)
    for _ in range(window - 1):
        policy.on_request("old")
    assert policy.recent_requests("old") == window - 1
    policy.on_request("new")
    assert policy.recent_requests("old") == (window - 1) / 2
    assert policy.recent_requests("new") == 0.5
