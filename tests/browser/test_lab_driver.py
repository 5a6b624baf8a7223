"The browser harness itself: its detectors must fire on the failures they are meant to catch (no notebook is run)."
import pytest

from labdriver import LabNotebook

pytestmark = pytest.mark.browser


def test_detectors_catch_widget_errors_tracebacks_console_errors_and_offline_requests(browser_context, lab_server):
    nb = LabNotebook(browser_context, lab_server, 'harness-self-test.ipynb')
    try:
        assert nb.problems() == []
        nb.page.set_content('<div class="jp-OutputArea-output">Error displaying widget: model not found</div>'
                            '<pre class="jp-RenderedText" data-mime-type="application/vnd.jupyter.stderr">'
                            'Traceback (most recent call last):\n  File "x", line 1\nValueError: boom</pre>')
        nb.page.evaluate("console.error('explorer failed: boom')")
        nb.page.evaluate("setTimeout(() => { throw new Error('uncaught boom') }, 0)")
        # the route guard refuses (and records) anything off 127.0.0.1
        assert nb.page.evaluate("fetch('http://example.com/').then(() => 'reached', () => 'refused')") == 'refused'
        nb.page.wait_for_timeout(300)
        probs = '\n'.join(nb.problems())
        assert '"Error displaying widget"' in probs
        assert 'ValueError: boom' in probs
        assert 'explorer failed: boom' in probs
        assert 'uncaught boom' in probs
        assert 'request off 127.0.0.1: http://example.com/' in probs
        with pytest.raises(AssertionError, match='Error displaying widget'): nb.assert_clean()
    finally:
        nb.page.close()
        browser_context.external_requests.clear()   # the refused request was ours: later tests start clean
