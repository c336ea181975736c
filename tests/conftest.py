from hypothesis import settings

# Wall-clock deadlines make property tests flaky on a loaded 2-core CI machine; correctness is what they check.
settings.register_profile("project", deadline=None, max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", 50)))
settings.load_profile("project")
