"""Unit tests for handler.py (stdlib unittest).

Run from the repository root:  python3 -m unittest discover -s examples/python-handler -v
"""

import json
import os
import unittest
from unittest import mock

import handler

MIXED_BATCH = {
    "records": [
        {"id": "r1", "key": "k1", "body": {"n": 1}},
        {"id": "r2", "key": "k1", "body": {"n": 2, "poison": True}},
        {"id": "r3", "key": "k2", "body": "plain string"},
    ]
}


class ResultsShapeTest(unittest.TestCase):
    def test_reports_each_record_on_its_own(self):
        self.assertEqual(
            handler.handle(MIXED_BATCH, "results"),
            {
                "results": [
                    {"id": "r1", "status": "success", "body": {"n": 1, "processed": True}},
                    {
                        "id": "r2",
                        "status": "error",
                        "error": {
                            "errorType": "PoisonRecord",
                            "errorMessage": 'record r2 is marked "poison": true',
                        },
                    },
                    {
                        "id": "r3",
                        "status": "success",
                        "body": {"value": "plain string", "processed": True},
                    },
                ]
            },
        )

    def test_does_not_mutate_the_event(self):
        event = json.loads(json.dumps(MIXED_BATCH))
        handler.handle(event, "results")
        self.assertEqual(event, MIXED_BATCH)

    def test_record_without_body_succeeds(self):
        self.assertEqual(
            handler.handle({"records": [{"id": "r1", "key": "k"}]}),
            {"results": [{"id": "r1", "status": "success", "body": {"value": None, "processed": True}}]},
        )

    def test_response_is_json_serializable(self):
        json.dumps(handler.handle(MIXED_BATCH, "results"))


class BatchItemFailuresShapeTest(unittest.TestCase):
    def test_lists_only_failed_ids(self):
        self.assertEqual(
            handler.handle(MIXED_BATCH, "batch_item_failures"),
            {"batchItemFailures": [{"itemIdentifier": "r2"}]},
        )

    def test_empty_list_when_everything_succeeds(self):
        event = {"records": [{"id": "r1", "key": "k", "body": {"poison": False}}]}
        self.assertEqual(
            handler.handle(event, "batch_item_failures"), {"batchItemFailures": []}
        )


class EntryPointTest(unittest.TestCase):
    def test_defaults_to_results_shape(self):
        with mock.patch.dict(os.environ, clear=False) as env:
            env.pop(handler.RESPONSE_SHAPE_ENV, None)
            self.assertIn("results", handler.handler(MIXED_BATCH, None))

    def test_env_selects_batch_item_failures(self):
        with mock.patch.dict(os.environ, {handler.RESPONSE_SHAPE_ENV: "batch_item_failures"}):
            self.assertEqual(
                handler.handler(MIXED_BATCH, None),
                {"batchItemFailures": [{"itemIdentifier": "r2"}]},
            )

    def test_unknown_shape_fails_the_invoke(self):
        with mock.patch.dict(os.environ, {handler.RESPONSE_SHAPE_ENV: "batchItemFailures"}):
            with self.assertRaises(ValueError):
                handler.handler(MIXED_BATCH, None)


if __name__ == "__main__":
    unittest.main()
